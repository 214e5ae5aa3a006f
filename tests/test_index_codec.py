"""The sparse cache's class-id storage: exact round trips in both layouts, the smaller layout chosen, the bytes."""

import pytest
import torch

from kdistill.losses.sparse import sparse_soft_loss, sparsify
from kdistill.teachers.index_codec import code_bytes, decode, encode, index_bits, layout_for
from kdistill.teachers.sparse import SparseCachedTeacher


@pytest.mark.parametrize("v,k", [(2, 1), (8, 3), (11, 11), (256, 1), (256, 128), (300, 37), (2048, 32),
                                 (50257, 5), (131072, 9)])
@pytest.mark.parametrize("layout", ["packed", "bitmap"])
def test_round_trip_is_exact_in_both_layouts(v, k, layout):
    g = torch.Generator().manual_seed(v + k)
    idx = torch.rand(3, 4, v, generator=g).argsort(-1)[..., :k]  # k distinct classes per position
    values = torch.randn(3, 4, k, generator=g)
    stored, codes, used = encode(values, idx, v, layout)
    assert used == layout and codes.dtype == torch.uint8 and codes.shape == (3, 4, code_bytes(v, k, layout))
    got = decode(codes, v, k, layout)
    if layout == "packed":
        assert torch.equal(got, idx) and torch.equal(stored, values)  # order kept
    else:  # class order, values permuted alike
        assert torch.equal(got, idx.sort(-1).values)
        assert torch.equal(stored, values.gather(-1, idx.sort(-1).indices))


def test_the_smaller_layout_and_its_bytes():
    assert [index_bits(v) for v in (2, 8, 9, 256, 257, 2048, 32000, 128256)] == [1, 3, 4, 8, 9, 11, 15, 17]
    assert layout_for(256, 128) == "bitmap" and code_bytes(256, 128, "bitmap") == 32  # not 128 one-byte ids
    assert layout_for(256, 32) == "packed" and code_bytes(256, 32, "packed") == 32  # a tie keeps the order
    assert layout_for(2048, 32) == "packed" and code_bytes(2048, 32, "packed") == 44  # 11 bits, not 16
    assert code_bytes(128256, 128, layout_for(128256, 128)) == 272  # 17 bits, not 32


@pytest.mark.parametrize("v,k", [(256, 128), (256, 8), (40, 40)])
def test_a_stored_cache_gives_the_loss_of_its_targets(v, k):
    g = torch.Generator().manual_seed(k)
    t = torch.randn(6, 5, v, generator=g) * 3
    s = torch.randn(6, 5, v, generator=g)
    y = torch.randint(0, v, (6, 5), generator=g)
    targets = sparsify(t, k)
    cache = SparseCachedTeacher.from_targets(torch.arange(6), targets)
    stored = cache.logits(None, torch.tensor([4, 0, 5, 1, 2, 3]))
    order = torch.tensor([4, 0, 5, 1, 2, 3])
    want = sparse_soft_loss(s[order], sparsify(t[order], k), temperature=2.0, labels=y[order])
    got = sparse_soft_loss(s[order], stored, temperature=2.0, labels=y[order])
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert cache.bytes_per_position() == k * 2 + code_bytes(v, k, layout_for(v, k)) + 2
