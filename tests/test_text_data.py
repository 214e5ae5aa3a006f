"""``text:PATH``: UTF-8 text as next-token windows (bytes or a byte-level BPE), split train/val/test."""

import pytest
import torch
from torch import nn

from kdistill import TrainConfig, data, fit
from kdistill.data.text import load_text, save_tokenizer


class ByteTagger(nn.Module):
    """Byte ids (B, L) -> next-byte logits (B, L, 256)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.out = nn.Embedding(256, 16), nn.Linear(16, 256)

    def forward(self, x):
        return self.out(self.emb(x))


def test_byte_windows_are_exact_next_token_pairs(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(401))  # 401 bytes: cut at 360 -> 44 + 5 windows of 8
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    b = data.load(f"text:{tmp_path / 't.txt'}", window=8, seed=1)
    assert b.classes == tuple(str(i) for i in range(256)) and b.train.per_position
    assert (len(b.train), len(b.val), len(b.test)) == (40, 4, 5)
    raw = torch.tensor(list(text.encode()))
    for split, base in ((b.train, 0), (b.val, 0), (b.test, 360)):
        assert split.x.dtype == split.y.dtype == torch.int64 and split.x.shape[1:] == (8,)
        for x, y, i in zip(split.x, split.y, split.index.tolist()):
            start = base + 8 * i
            assert torch.equal(x, raw[start:start + 8]) and torch.equal(y, raw[start + 1:start + 9])
    assert set(b.train.index.tolist()).isdisjoint(b.val.index.tolist())
    again = data.load(f"text:{tmp_path / 't.txt'}", window=8, seed=1)
    other = data.load(f"text:{tmp_path / 't.txt'}", window=8, seed=2)
    assert torch.equal(again.val.index, b.val.index) and not torch.equal(other.val.index, b.val.index)


def test_a_folder_of_txt_files_is_read_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("world " * 20, encoding="utf-8")
    (tmp_path / "a.txt").write_text("héllo " * 20, encoding="utf-8")
    (tmp_path / "skip.md").write_text("not text data", encoding="utf-8")
    b, tok = load_text(tmp_path, window=4)
    assert tok is None
    first = b.train if 0 in b.train.index.tolist() else b.val
    row = first.x[first.index.tolist().index(0)]
    assert bytes(row.tolist()) == "héllo".encode()[:4]
    assert set(b.test.y.flatten().tolist()) <= set(b"world ")  # the last 10% is b.txt's: joined after a.txt


def test_refusals_name_the_problem(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café au lait".encode("latin-1") * 20)
    with pytest.raises(ValueError, match=r"latin1\.txt.*save it as UTF-8"):
        data.load(f"text:{bad}")
    short = tmp_path / "short.txt"
    short.write_text("tiny", encoding="utf-8")
    with pytest.raises(ValueError, match="shorter than one window"):
        data.load(f"text:{short}", window=64)
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="no text"):
        data.load(f"text:{empty}")
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.load(f"text:{tmp_path / 'missing.txt'}")
    with pytest.raises(ValueError, match="data.tokenizer"):
        data.load(f"text:{short}", tokenizer="words")


def test_fit_learns_a_repetitive_text_per_position(tmp_path):
    (tmp_path / "t.txt").write_text("abcdefghijklmnopqrstuvwxyz. " * 60, encoding="utf-8")  # one next byte each
    b = data.load(f"text:{tmp_path / 't.txt'}", window=16)
    r = fit(ByteTagger(), b.train, TrainConfig(epochs=8, batch_size=16, lr=0.05), method="ce",
            val=b.val, test=b.test, progress=False)
    assert r.test["count"] == b.test.y.numel()
    assert r.val["accuracy"] > 0.8 and r.test["accuracy"] > 0.8


@pytest.mark.ecosystem
def test_bpe_is_trained_without_the_test_text_and_is_deterministic(tmp_path):
    from ecosystem import need

    need("tokenizers")
    text = "low lower lowest newer newest wider widest " * 60 + "qqqq " * 50  # "qqqq" only in the last 10%
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    b1, tok1 = load_text(tmp_path / "t.txt", window=8, tokenizer="bpe", vocab_size=300, seed=0)
    b2, tok2 = load_text(tmp_path / "t.txt", window=8, tokenizer="bpe", vocab_size=300, seed=0)
    assert tok1.to_str() == tok2.to_str() and torch.equal(b1.train.x, b2.train.x)
    assert 256 < len(b1.classes) == tok1.get_vocab_size() <= 300
    assert "qq" not in tok1.get_vocab() and "Ġlowest" in tok1.get_vocab()  # the test tail is unseen
    assert int(b1.train.x.max()) >= 256 and b1.train.x.dtype == torch.int64
    assert torch.equal(b1.train.x[:, 1:], b1.train.y[:, :-1])
    saved = save_tokenizer(tok1, tmp_path)
    tk = need("tokenizers")
    assert tk.Tokenizer.from_file(str(saved)).to_str() == tok1.to_str()
    via_load = data.load(f"text:{tmp_path / 't.txt'}", window=8, tokenizer="bpe", vocab_size=300)
    assert torch.equal(via_load.test.x, b1.test.x)
