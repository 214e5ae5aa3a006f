"""Hugging Face causal LMs (``hf:TYPE,task=causal-lm``) as teachers and students of per-position distillation.

Token windows of a sequence a one-layer GPT-2 learns in a few epochs (each token is the previous one plus one,
modulo the vocabulary), labels the next token (-100 where there is none, and on padded rows): a teacher
trained with ``ce``, a smaller student distilled from it with ``kd``, a teacher of another vocabulary refused
before any work, and the saved student (embedding and head tied) reloaded from its file alone."""

import pytest
import torch

from ecosystem import need
from kdistill import TrainConfig, fit
from kdistill.io import load_model
from kdistill.models.outputs import forward_logits
from kdistill.models.registry import build_model

V, L = 64, 16
TEACHER = "hf:gpt2,task=causal-lm,n_layer=1,n_head=2,n_embd=32,n_positions=32"
STUDENT = "hf:gpt2,task=causal-lm,n_layer=1,n_head=1,n_embd=16,n_positions=32"


def _windows(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (n, L) with x[t+1] = (x[t] + 1) % V (every token starts some window), labels = the next token:
    -100 at the last position and on the second half of every eighth row (padding)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, V, (n,), generator=g)
    start[: min(n, V)] = torch.randperm(V, generator=g)[: min(n, V)]
    x = (start[:, None] + torch.arange(L)[None]) % V
    y = (x + 1) % V
    y[:, -1] = -100
    y[::8, L // 2:] = -100
    return x, y


def _accuracy(model, x, y) -> float:
    """Next-token accuracy over the scored positions, computed here from the model's own logits."""
    model.eval()
    with torch.no_grad():
        pred = forward_logits(model, x).argmax(-1)
    keep = y != -100
    return float((pred[keep] == y[keep]).float().mean())


@pytest.mark.ecosystem
def test_gpt2_teacher_distils_into_a_smaller_gpt2_student():
    need("transformers")
    x, y = _windows(64, 0)
    tx, ty = _windows(32, 1)
    assert x.dtype == torch.int64
    cfg = TrainConfig(epochs=10, batch_size=16, lr=0.02, optimizer="adamw", seed=0)
    teacher = build_model(TEACHER, (L,), V, seed=0)
    assert teacher.config.vocab_size == V and type(teacher).__name__ == "GPT2LMHeadModel"  # vocab = data's classes
    t = fit(teacher, (x, y), cfg, test=(tx, ty), progress=False)
    assert t.test["accuracy"] > 0.9 and t.test["count"] == int((ty != -100).sum())
    student = build_model(STUDENT, (L,), V, seed=1)
    s = fit(student, (x, y), cfg, teacher=teacher, method={"name": "kd", "temperature": 2.0, "alpha": 0.5},
            test=(tx, ty), progress=False)
    assert s.test["accuracy"] > 0.9
    assert _accuracy(student, tx, ty) == pytest.approx(s.test["accuracy"], abs=1e-6)
    kd = [row["loss_kd"] for row in s.history]
    assert kd[-1] < 0.5 * kd[0], kd


@pytest.mark.ecosystem
def test_a_teacher_of_another_vocabulary_is_refused_before_any_work(tmp_path):
    need("transformers")
    x, y = _windows(64, 0)
    teacher = build_model(f"{TEACHER},vocab_size=128", (L,), V, seed=0)
    for cache in (None, False):  # cached teacher logits (the default for in-memory data) and a live teacher
        out = tmp_path / f"run_{cache}"
        with pytest.raises(ValueError) as err:
            fit(build_model(STUDENT, (L,), V, seed=1), (x, y), TrainConfig(epochs=1, cache_teacher=cache),
                teacher=teacher, method="kd", out_dir=out, progress=False)
        msg = str(err.value)
        assert msg.startswith("teacher: outputs 128 classes (vocabulary) per position")
        assert "have 64" in msg and "must share a vocabulary" in msg
        assert not out.exists() or not any(out.iterdir())  # refused before any file


@pytest.mark.ecosystem
def test_a_saved_causal_lm_reloads_from_its_file_with_the_same_logits(tmp_path):
    need("transformers")
    x, y = _windows(64, 0)
    model = build_model(STUDENT, (L,), V, seed=1)
    fit(model, (x, y), TrainConfig(epochs=1, batch_size=16), out_dir=tmp_path, progress=False)
    again = load_model(tmp_path / "model.safetensors")
    assert type(again).__name__ == "GPT2LMHeadModel" and again.config.vocab_size == V
    assert again.lm_head.weight.data_ptr() == again.transformer.wte.weight.data_ptr()  # still tied
    model.eval()
    again.eval()
    with torch.no_grad():
        assert torch.equal(forward_logits(model, x[:8]), forward_logits(again, x[:8]))
