"""Batched augmentation (kdistill.data.augment): specs, draws, deterministic views, normalisation."""

import pytest
import torch

from kdistill.data.augment import (
    AugParams,
    Augment,
    _splitmix64,
    _to_int64,
    channel_stats,
    jitter,
    jitter_offsets,
    normalize,
    parse_augment,
    translate,
)


def _images(b=16, c=3, h=8, w=9, seed=0):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "spec, crop, flip, canonical",
    [
        (None, 0, False, "none"),
        ("", 0, False, "none"),
        ("none", 0, False, "none"),
        ([], 0, False, "none"),
        ("crop2", 2, False, "crop2"),
        ("jitter3", 3, False, "crop3"),
        ("flip", 0, True, "flip"),
        (" flip , crop4 ", 4, True, "crop4,flip"),
        (["jitter1", "flip"], 1, True, "crop1,flip"),
    ],
)
def test_parse_and_str_round_trip(spec, crop, flip, canonical):
    aug = parse_augment(spec)
    assert (aug.crop, aug.flip, aug.pixels) == (crop, flip, crop)
    assert str(aug) == canonical
    assert parse_augment(str(aug)) == aug
    assert aug.is_identity == (crop == 0 and not flip)
    assert parse_augment(aug) is aug


@pytest.mark.parametrize(
    "spec, match",
    [
        ("crp2", r"unknown op 'crp2'; known: crop<N>, flip, jitter<N> \(did you mean 'crop2'\?\)"),
        ("flp", r"unknown op 'flp'.*did you mean 'flip'"),
        ("jiter", r"unknown op 'jiter'.*did you mean 'jitter<N>'"),
        ("rotate90", r"^train.augment: unknown op 'rotate90'; known: crop<N>, flip, jitter<N>$"),
        ("crop0", r"N must be >= 1"),
        ("jitter-2", r"N must be >= 1"),
        ("crop", r"needs a pixel count"),
        ("flip1", r"flip takes no number"),
        ("flip,flip", r"repeats 'flip'"),
        ("crop2,jitter2", r"'jitter2' repeats 'crop2'"),
        ("none,flip", r"unknown op 'none'"),
    ],
)
def test_parse_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_augment(spec)


def test_augment_rejects_bad_fields():
    with pytest.raises(ValueError, match="crop"):
        Augment(crop=-1)
    with pytest.raises(ValueError, match="flip"):
        Augment(flip=1)


# --------------------------------------------------------------------------- draws and apply


@pytest.mark.parametrize("pixels", [1, 2, 3])
def test_crop_reproduces_jitter_bit_for_bit(pixels):
    x = _images()
    g1, g2, g3 = (torch.Generator().manual_seed(7) for _ in range(3))
    aug = parse_augment(f"crop{pixels}")
    for _ in range(3):  # several steps: the generators stay in step
        params = aug.draw(len(x), g1)
        assert params.flip is None
        want = jitter(x, pixels, g2)
        assert torch.equal(aug.apply(x, params), want)
        # the trainer's path: jitter_offsets on the CPU, translate on the device
        assert torch.equal(params.offsets, jitter_offsets(len(x), pixels, g3))


def test_crop_then_flip_draws_crop_first():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    params = parse_augment("crop2,flip").draw(64, g1)
    assert torch.equal(params.offsets, jitter_offsets(64, 2, g2))
    assert params.flip.dtype == torch.bool and params.flip.shape == (64,)
    assert 10 < int(params.flip.sum()) < 54


@pytest.mark.parametrize("channels", [1, 3, 5])
def test_flip_flips_exactly_the_masked_images(channels):
    x = _images(c=channels)
    mask = torch.arange(16) % 3 == 0
    out = parse_augment("flip").apply(x, AugParams(flip=mask))
    assert torch.equal(out[mask], x[mask].flip(-1))
    assert torch.equal(out[~mask], x[~mask])


@pytest.mark.parametrize("channels", [1, 3])
def test_apply_is_pure_and_composes_crop_then_flip(channels):
    x = _images(c=channels)
    x_before = x.clone()
    aug = parse_augment("crop2,flip")
    params = aug.draw(len(x), torch.Generator().manual_seed(1))
    a, b = aug.apply(x, params), aug.apply(x, params)
    assert torch.equal(a, b) and torch.equal(x, x_before)
    assert a.shape == x.shape
    cropped = translate(x, params.offsets, 2)
    want = torch.where(params.flip.view(-1, 1, 1, 1), cropped.flip(-1), cropped)
    assert torch.equal(a, want)


def test_call_and_identity():
    x = _images()
    assert parse_augment(None)(x) is x
    aug = parse_augment("crop1,flip")
    out = aug(x, torch.Generator().manual_seed(5))
    params = aug.draw(len(x), torch.Generator().manual_seed(5))
    assert torch.equal(out, aug.apply(x, params.to("cpu")))


def test_apply_checks_params_and_shape():
    aug = parse_augment("crop2,flip")
    x = _images(b=4)
    with pytest.raises(ValueError, match="offsets"):
        aug.apply(x, AugParams(flip=torch.zeros(4, dtype=torch.bool)))
    with pytest.raises(ValueError, match="flip"):
        aug.apply(x, AugParams(offsets=torch.zeros(2, 4, dtype=torch.long)))
    with pytest.raises(ValueError, match="B, C, H, W"):
        aug.apply(x[0], aug.draw(4))


# --------------------------------------------------------------------------- deterministic views


def _reference_splitmix64(x: int) -> int:
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_splitmix64_matches_unsigned_reference():
    xs = [0, 1, 2, 3, -1, -2, 2**40 + 17, -(2**63), 2**63 - 1]
    got = _splitmix64(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [_to_int64(_reference_splitmix64(x & ((1 << 64) - 1))) for x in xs]
    assert _reference_splitmix64(0) == 0xE220A8397B1DCDAF  # the published first output of splitmix64(seed 0)


def test_view_params_independent_of_batch_order_and_composition():
    aug = parse_augment("crop3,flip")
    ids = torch.arange(100, 400)
    full = aug.view_params(ids, 2, seed=11)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    shuffled = aug.view_params(ids[perm], 2, seed=11)
    assert torch.equal(shuffled.offsets, full.offsets[:, perm]) and torch.equal(shuffled.flip, full.flip[perm])
    part = aug.view_params(ids[50:60], 2, seed=11)
    assert torch.equal(part.offsets, full.offsets[:, 50:60]) and torch.equal(part.flip, full.flip[50:60])
    # per-sample views: sample i's params at view k equal the batch drawn with view=k
    views = torch.arange(300) % 4
    mixed = aug.view_params(ids, views, seed=11)
    at2 = views == 2
    assert torch.equal(mixed.offsets[:, at2], full.offsets[:, at2])
    # same images in any batch order
    x = _images(b=300, c=1, h=6, w=6)
    out = aug.apply(x, full)
    assert torch.equal(aug.apply(x[perm], shuffled), out[perm])


def test_view_params_vary_with_view_and_seed_and_cover_the_range():
    aug = parse_augment("crop2,flip")
    ids = torch.arange(2000)
    base = aug.view_params(ids, 0, seed=0)
    for other in (aug.view_params(ids, 1, seed=0), aug.view_params(ids, 0, seed=1)):
        same = (other.offsets == base.offsets).all(0) & (other.flip == base.flip)
        assert same.float().mean() < 0.1  # 1 / (5 * 5 * 2) = 0.02 expected by chance
    assert base.offsets.dtype == torch.long and base.offsets.shape == (2, 2000)
    assert set(base.offsets.flatten().tolist()) == {0, 1, 2, 3, 4}
    for row in base.offsets:
        counts = torch.bincount(row, minlength=5).float() / 2000
        assert (counts - 0.2).abs().max() < 0.04
    assert abs(base.flip.float().mean().item() - 0.5) < 0.05
    # view 0 is an ordinary random draw, not the identity
    assert (base.offsets != 2).any()


def test_view_params_identity_and_shapes():
    assert parse_augment(None).view_params(torch.arange(5), 0) == AugParams(None, None)
    p = parse_augment("flip").view_params(torch.arange(5), 3, seed=2**70 + 5)  # any int seed
    assert p.offsets is None and p.flip.shape == (5,)
    with pytest.raises(ValueError, match="view"):
        parse_augment("flip").view_params(torch.arange(5), torch.arange(4))


# --------------------------------------------------------------------------- normalisation


def test_normalize_matches_direct_computation():
    x = _images(c=3)
    mean, std = [0.1, -0.2, 0.3], [0.5, 2.0, 1.5]
    want = torch.stack([(x[:, i] - mean[i]) / std[i] for i in range(3)], dim=1)
    assert torch.allclose(normalize(x, mean, std), want, atol=1e-6)
    assert torch.allclose(normalize(x, torch.tensor(mean), torch.tensor(std)), want, atol=1e-6)


@pytest.mark.parametrize(
    "args, match",
    [
        (([0.0, 0.0], [1.0, 1.0, 1.0]), "mean: need one value per channel \\(3\\)"),
        (([0.0] * 3, [1.0] * 4), "std: need one value per channel"),
        (([0.0] * 3, [1.0, 0.0, 1.0]), "std: every channel"),
    ],
)
def test_normalize_errors(args, match):
    with pytest.raises(ValueError, match=match):
        normalize(_images(c=3), *args)


def test_channel_stats_matches_direct_computation_in_chunks():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(37, 3, 5, 4, generator=g) * torch.tensor([1.0, 3.0, 0.1]).view(1, 3, 1, 1) + torch.tensor(
        [100.0, -2.0, 0.5]
    ).view(1, 3, 1, 1)
    xd = x.double()
    want_mean = xd.mean(dim=(0, 2, 3))
    want_std = xd.transpose(0, 1).reshape(3, -1).std(dim=1, correction=0)
    for batch in (1, 5, 37, 4096):
        mean, std = channel_stats(x, batch=batch)
        assert mean.dtype == torch.float64 and mean.shape == (3,)
        assert torch.allclose(mean, want_mean, rtol=1e-12, atol=1e-12)
        assert torch.allclose(std, want_std, rtol=1e-10)
    mean, std = channel_stats(x)
    assert normalize(x, mean.float(), std.float()).double().std(dim=(0, 2, 3), correction=0).sub(1).abs().max() < 1e-4
    u8 = torch.randint(0, 256, (10, 1, 3, 3), dtype=torch.uint8, generator=g)
    m, s = channel_stats(u8, batch=3)
    assert torch.allclose(m, u8.double().mean().view(1)) and torch.allclose(s, u8.double().std(correction=0).view(1))
    with pytest.raises(ValueError, match="empty"):
        channel_stats(x[:0])
