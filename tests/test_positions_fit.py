"""Per-position targets in ``fit``: (N, L) labels with -100 = not scored, models giving (B, L, C) logits.

Each term averages over the valid positions of the whole batch, so gradient accumulation and data-parallel
shards give the step of the whole batch whatever the padding; val/test report accuracy, NLL and perplexity
over valid positions."""

import math
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from kdistill import TrainConfig, fit
from kdistill.data.convert import as_split
import kdistill.teachers.teaching as teaching
from kdistill.engine.evaluate import classification_metrics
from kdistill.losses import hard_loss
from kdistill.models import ClassesLast
from kdistill.sweeps.multi import fit_many
from kdistill.teachers.base import ModuleTeacher

V, L = 8, 6


class Tagger(nn.Module):
    """Token ids (B, L) -> per-position logits (B, L, V)."""

    def __init__(self, seed: int = 0, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.out = nn.Embedding(V, width), nn.Linear(width, V)

    def forward(self, x):
        return self.out(self.emb(x))


def _copy_teacher(scale: float = 6.0) -> nn.Module:
    """A teacher that knows the task (predict the current token): logits = scale * onehot(x)."""
    emb = nn.Embedding(V, V)
    with torch.no_grad():
        emb.weight.copy_(scale * torch.eye(V))
    return emb


def _padded(n: int, seed: int = 0, lengths=None):
    """Token ids (n, L) and labels = the ids, padded with -100 after each row's length (variable lengths)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (n, L), generator=g)
    lens = torch.randint(1, L + 1, (n,), generator=g) if lengths is None else torch.as_tensor(lengths)
    y = x.clone()
    y[torch.arange(L)[None] >= lens[:, None]] = -100
    return x, y


class _Counting(ModuleTeacher):
    def __init__(self, module):
        super().__init__(module)
        self.calls = 0

    def logits(self, x, ids=None):
        self.calls += 1
        return super().logits(x, ids)


@pytest.mark.parametrize("cache", [False, None])  # live teacher; cached (auto: in-memory data is cached)
def test_fit_learns_a_per_position_task_from_a_teacher(cache):
    x, y = _padded(96)
    vx, vy = _padded(64, seed=1)
    teacher = _Counting(_copy_teacher())
    cfg = TrainConfig(epochs=15, batch_size=16, lr=0.1, cache_teacher=cache)
    r = fit(Tagger(), (x, y), cfg, teacher=teacher, method={"name": "kd", "temperature": 2.0, "alpha": 0.5},
            val=(vx, vy), test=(vx, vy), progress=False)
    steps = 15 * (96 // 16)
    assert (teacher.calls > steps) if cache is False else (teacher.calls < 5)  # live: every step; cached: once
    valid = int((vy != -100).sum())
    assert r.val["count"] == r.test["count"] == valid < vy.numel()
    assert r.val["accuracy"] > 0.99 and r.test["accuracy"] > 0.99
    assert 1.0 <= r.val["perplexity"] < 1.5 and r.val["perplexity"] == pytest.approx(math.exp(r.val["nll"]))
    assert {"val_accuracy", "val_errors", "val_nll", "val_perplexity", "loss_kd", "loss_ce"} <= set(r.history[-1])
    assert r.history[-1]["val_errors"] == r.val["errors"] == 0


def test_ce_learns_per_position_labels_streamed():
    x, y = _padded(64)

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return x[i], y[i]

    split = as_split(Items(), name="tokens")
    assert split.per_position and split.num_classes == V
    r = fit(Tagger(), split, TrainConfig(epochs=20, batch_size=16, lr=0.1), method="ce", val=(x, y), progress=False)
    assert r.val["accuracy"] > 0.99 and r.val["count"] == int((y != -100).sum())


def _one_step(accumulate: int, method: str, x, y) -> list[torch.Tensor]:
    cfg = TrainConfig(epochs=1, batch_size=len(x), lr=0.5, momentum=0.0, accumulate=accumulate, seed=3)
    teacher = _copy_teacher(3.0) if method == "kd" else None
    spec = {"name": "kd", "temperature": 2.0, "alpha": 0.3} if method == "kd" else "ce"
    r = fit(Tagger(seed=1), (x, y), cfg, teacher=teacher, method=spec, progress=False)
    return [p.detach().clone() for p in r.model.parameters()]


def _uneven(n: int = 8):
    """Half of the rows long, half short, an odd number of positions in all: however the rows are shuffled,
    two halves of the batch (micro-batches, processes) never hold the same number of valid positions."""
    return _padded(n, seed=2, lengths=[L] * (n // 2) + [1] * (n // 2 - 1) + [2])


@pytest.mark.parametrize("method", ["ce", "kd"])
def test_accumulation_gives_the_whole_batch_step(method):
    x, y = _uneven()
    whole = _one_step(1, method, x, y)
    for k in (2, 4):
        for a, b in zip(_one_step(k, method, x, y), whole):
            assert torch.allclose(a, b, atol=1e-6, rtol=0), (k, (a - b).abs().max())
    # The test can fail: averaging each micro-batch over its own positions (no whole-batch normalizer) moves
    # the weights by another gradient on this padding.
    model = Tagger(seed=1)
    logits = model(x)
    g_whole = torch.autograd.grad(hard_loss(logits, y), model.out.weight, retain_graph=True)[0]
    g_micro = torch.autograd.grad(sum(hard_loss(lg, yy) for lg, yy in zip(logits.chunk(2), y.chunk(2))) / 2,
                                  model.out.weight)[0]
    assert (g_whole - g_micro).abs().max() > 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, n: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=n)
    try:
        torch.set_num_threads(1)
        x, y = _uneven()
        torch.save(_one_step(1, "kd", x, y), os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done with every collective before either tears gloo down (else SIGABRT)
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_whole_batch_step(tmp_path):
    """The two processes hold different numbers of valid positions: the count is summed over processes and
    divided by the world size (DDP averages gradients)."""
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    x, y = _uneven()
    alone = _one_step(1, "kd", x, y)
    for r in (0, 1):
        for a, b in zip(torch.load(tmp_path / f"rank{r}.pt", weights_only=True), alone):
            assert torch.allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", [{"name": "dkd"}, {"name": "fitnet"}, {"name": "at"}])
def test_methods_without_positions_are_refused(method):
    x, y = _padded(16)
    with pytest.raises(ValueError, match=f"{method['name']}: per-position targets are not supported; use kd or ce"):
        fit(Tagger(), (x, y), TrainConfig(epochs=1, batch_size=8), teacher=_copy_teacher(), method=method,
            progress=False)


def test_a_cache_beyond_the_budget_is_refused_naming_a_live_teacher(monkeypatch):
    x, y = _padded(16)
    monkeypatch.setattr(teaching, "POSITION_CACHE_BYTES", 16 * L * V * 4 - 1)
    with pytest.raises(ValueError, match="train.cache_teacher: false to use a live teacher"):
        fit(Tagger(), (x, y), TrainConfig(epochs=1, batch_size=8), teacher=_copy_teacher(), progress=False)
    r = fit(Tagger(), (x, y), TrainConfig(epochs=1, batch_size=8, cache_teacher=False), teacher=_copy_teacher(),
            progress=False)
    assert r.history[-1]["train_loss"] > 0


def test_mixed_label_kinds_and_bad_position_labels_are_refused():
    x, y = _padded(16)
    with pytest.raises(ValueError, match="val: .* one label per sample .* per-position"):
        fit(Tagger(), (x, y), TrainConfig(epochs=1, batch_size=8), method="ce", val=(x, y[:, 0].clamp(min=0)),
            progress=False)
    bad = y.clone()
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="y: per-position labels must be class ids >= 0 or -100"):
        fit(Tagger(), (x, bad), TrainConfig(epochs=1, batch_size=8), method="ce", progress=False)
    with pytest.raises(ValueError, match="fit_many: per-position targets"):
        fit_many([Tagger()], as_split((x, y)), TrainConfig(epochs=1, batch_size=8), progress=False)
    with pytest.raises(ValueError, match="need one integer label per sample"):  # float (N, C): still refused
        fit(Tagger(), (x, F.one_hot(x[:, 0], V).float()), TrainConfig(epochs=1, batch_size=8), progress=False)


def test_position_metrics_match_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 4, generator=g) * 3
    labels = torch.randint(0, 4, (5, 7), generator=g)
    labels[0, 3:] = -100
    labels[4, :] = -100
    teacher = torch.randn(5, 7, 4, generator=g)
    m = classification_metrics(logits, labels, teacher, temperature=2.0)
    valid = labels != -100
    z, yv, t = logits.double()[valid], labels[valid], teacher.double()[valid]
    nll = -(z.log_softmax(-1).gather(1, yv[:, None])).mean().item()
    acc = (z.argmax(-1) == yv).double().mean().item()
    kl = (F.softmax(t / 2, -1) * (F.log_softmax(t / 2, -1) - F.log_softmax(z / 2, -1))).sum(-1).mean().item()
    assert m["count"] == int(valid.sum()) == 5 * 7 - 4 - 7
    assert m["accuracy"] == pytest.approx(acc, abs=1e-7) and m["errors"] == round((1 - acc) * m["count"])
    assert m["nll"] == pytest.approx(nll, rel=1e-6) and m["perplexity"] == pytest.approx(math.exp(nll), rel=1e-6)
    assert m["kl_to_teacher"] == pytest.approx(kl, rel=1e-5)
    agree = (z.argmax(-1) == t.argmax(-1)).double().mean().item()
    assert m["teacher_agreement"] == pytest.approx(agree, abs=1e-7)
    assert sum(sum(r) for r in m["confusion"]) == m["count"]


class _Segmenter(nn.Module):
    """Images (B, 3, H, W) -> (B, 3, H, W) class scores, classes second, as segmentation networks give them."""

    def __init__(self, seed: int, width: int = 8) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = nn.Conv2d(3, width, 3, padding=1), nn.Conv2d(width, 3, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class _PixelDataset(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_pixels_train_with_a_segmentation_teacher_whatever_the_batch_split():
    """(N, H, W) labels with (N, 3, H, W) images: per-pixel terms over the whole batch's valid pixels; a
    classes-second network is refused naming ClassesLast; accumulation, a live teacher and a streamed
    Dataset give the same step as the cached in-memory run."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3, 6, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    y[:7, :3] = -100  # unevenly unscored pixels
    with pytest.raises(ValueError, match=r"classes come second.*ClassesLast"):
        fit(_Segmenter(0), (x, y), TrainConfig(epochs=1), progress=False)
    teacher = ClassesLast(_Segmenter(1, width=16))
    fit(teacher, (x, y), TrainConfig(epochs=3, batch_size=16, lr=0.05), progress=False)
    start = ClassesLast(_Segmenter(2)).state_dict()
    method = {"name": "kd", "temperature": 2.0, "alpha": 0.5}

    def run(data, **cfg):
        student = ClassesLast(_Segmenter(2))
        student.load_state_dict(start)
        return fit(student, data, TrainConfig(epochs=2, batch_size=16, lr=0.05, seed=1, **cfg), teacher=teacher,
                   method=method, val=(x[:16], y[:16]), progress=False)

    base = run((x, y))
    assert 0.3 < base.val["accuracy"] <= 1 and base.val["perplexity"] > 1
    for other in (run((x, y), accumulate=2), run((x, y), cache_teacher=False), run(_PixelDataset(x, y))):
        for p, q in zip(base.model.parameters(), other.model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


class _KeywordTagger(nn.Module):
    """Hugging Face style: ``forward(input_ids, attention_mask)`` -> (B, L, V)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.out = nn.Embedding(V, 16), nn.Linear(16, V)

    def forward(self, input_ids, attention_mask=None):
        return self.out(self.emb(input_ids))


class _DictTokens(torch.utils.data.Dataset):
    def __init__(self, x, mask, y):
        self.x, self.mask, self.y = x, mask, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": self.mask[i]}, self.y[i]


def test_attention_mask_zeros_are_never_scored_even_with_labels_there():
    """Dict batches: a position whose attention_mask is 0 counts as padding (label -100) in the loss, its
    normaliser and the metrics, whether or not its label was set to -100."""
    x, y = _padded(40, seed=4)
    mask = (y != -100).long()
    unmasked_labels = torch.where(y == -100, x, y)  # padding labelled with real token ids, as users forget to
    method = {"name": "kd", "temperature": 2.0, "alpha": 0.5}

    def run(labels):
        data = _DictTokens(x, mask, labels)
        return fit(_KeywordTagger(3), data, TrainConfig(epochs=2, batch_size=8, lr=0.1, seed=0, accumulate=2),
                   teacher=_KeywordTagger(9), method=method, val=_DictTokens(x, mask, labels), progress=False)

    want, got = run(y), run(unmasked_labels)
    assert got.val["count"] == int((y != -100).sum()) == want.val["count"]
    for p, q in zip(want.model.parameters(), got.model.parameters()):
        torch.testing.assert_close(p, q)


def test_labels_that_copy_the_input_ids_get_a_warning_naming_the_shift():
    """Hugging Face style labels (= input_ids, shifted inside HF models) would train a copy task silently."""
    x, _ = _padded(32, seed=6)
    cfg = TrainConfig(epochs=1, batch_size=16)
    with pytest.warns(UserWarning, match=r"labels\[:, i\] = input_ids\[:, i \+ 1\]"):
        fit(Tagger(), (x, x.clone()), cfg, progress=False)
    with pytest.warns(UserWarning, match="kdistill does not"):
        fit(_KeywordTagger(0), _DictTokens(x, torch.ones_like(x), x.clone()), cfg, progress=False)
    shifted = torch.cat([x[:, 1:], torch.full((len(x), 1), -100)], dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fit(Tagger(), (x, shifted), cfg, progress=False)  # next-token labels: no warning
