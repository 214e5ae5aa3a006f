"""Sparse cached teachers in fit: top-k + tail per (sample id, position), the manifest checked on reuse,
train.teacher_topk, and k = V training exactly as the dense cache."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdistill import TrainConfig, fit
from kdistill.cli.app import main
from kdistill.data.convert import as_split
from kdistill.losses.sparse import sparsify
from kdistill.teachers.base import ModuleTeacher
from kdistill.teachers.sparse import sparse_cache

V, L = 8, 6


class Tagger(nn.Module):
    def __init__(self, seed: int = 0, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.mix, self.out = nn.Embedding(V, width), nn.Linear(width, width), nn.Linear(width, V)

    def forward(self, x):
        return self.out(torch.tanh(self.mix(self.emb(x))))


class Counting(ModuleTeacher):
    def __init__(self, module):
        super().__init__(module)
        self.calls = 0

    def logits(self, x, ids=None):
        self.calls += 1
        return super().logits(x, ids)


def _padded(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (n, L), generator=g)
    lens = torch.randint(1, L + 1, (n,), generator=g)
    y = torch.roll(x, -1, dims=1)
    y[torch.arange(L)[None] >= lens[:, None]] = -100
    return x, y


def _fit(teacher, cfg=None, data=None, method=None):
    x, y = data if data is not None else _padded(64)
    cfg = cfg or TrainConfig(epochs=3, batch_size=16, lr=0.05, seed=3)
    return fit(Tagger(), (x, y), cfg, teacher=teacher, progress=False,
               method=method or {"name": "kd", "temperature": 2.0, "alpha": 0.7})


def test_k_equal_to_vocabulary_trains_as_the_dense_cache():
    data = _padded(64)
    train = as_split(data, name="train")
    dense = _fit(Tagger(seed=7), data=data)  # in-memory data: fit caches the dense teacher itself
    exact = _fit(sparse_cache(Tagger(seed=7), train, V, value_dtype="float32"), data=data)
    half = _fit(sparse_cache(Tagger(seed=7), train, V), data=data)  # float16 values, as stored by default
    d, e, h = ([row["train_loss"] for row in r.history] for r in (dense, exact, half))
    assert e == pytest.approx(d, rel=1e-5)
    assert h == pytest.approx(d, rel=1e-2)
    sparse = _fit(sparse_cache(Tagger(seed=7), train, 2), data=data)
    assert sparse.history[-1]["train_loss"] < sparse.history[0]["train_loss"]  # k = 2 trains


def test_outputs_are_keyed_by_sample_id_not_batch_position():
    x, y = _padded(20)
    data = as_split((x, y), name="train").subset(torch.tensor([9, 2, 15, 4]), "part")  # ids 9, 2, 15, 4
    teacher = Tagger(seed=1)
    cache = sparse_cache(teacher, data, 3)
    got = cache.logits(None, torch.tensor([15, 9]))
    want = sparsify(teacher(x[[15, 9]]), 3)
    order = want.indices.long().sort(dim=-1)  # V = 8, k = 3: stored as a class bitmap, in class order
    torch.testing.assert_close(got.values, want.values.gather(-1, order.indices))
    assert torch.equal(got.indices, order.values)
    with pytest.raises(ValueError, match="does not cover every sample"):
        cache.check_covers(as_split((x, y), name="all"))


def test_manifest_reused_when_it_matches_and_refused_naming_what_changed(tmp_path):
    x, y = _padded(32)
    data = as_split((x, y), name="train")
    path = tmp_path / "top3.safetensors"
    teacher = Counting(Tagger(seed=1))
    first = sparse_cache(teacher, data, 3, path=path)
    calls = teacher.calls
    again = sparse_cache(teacher, data, 3, path=path)
    assert teacher.calls == calls and torch.equal(again.targets.indices, first.targets.indices)
    assert again.manifest["index_layout"] == "bitmap" and again.manifest["value_dtype"] == "float16"
    assert set(load_file(str(path))) == {"ids", "values", "codes", "tail"}
    assert again.bytes_per_position() == 3 * 2 + 1 + 2  # float16 values, an 8-class bitmap, the tail
    with pytest.raises(ValueError, match=r"k \(file: 3, this run: 4\)"):
        sparse_cache(teacher, data, 4, path=path)
    with pytest.raises(ValueError, match="teacher_sha256 differs"):
        sparse_cache(Tagger(seed=2), data, 3, path=path)
    with pytest.raises(ValueError, match="data_sha256 differs"):
        sparse_cache(teacher, as_split(_padded(32, seed=5), name="train"), 3, path=path)
    with pytest.raises(ValueError, match="tokenizer_sha256 differs"):
        sparse_cache(teacher, data, 3, path=path, tokenizer="bpe-512")
    with pytest.raises(ValueError, match=r"value_dtype \(file: 'float16', this run: 'bfloat16'\)"):
        sparse_cache(teacher, data, 3, path=path, value_dtype="bfloat16")


def test_train_teacher_topk_builds_the_sparse_cache_once(tmp_path):
    teacher = Counting(Tagger(seed=7))
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, teacher_topk=3)
    r = _fit(teacher, cfg)
    assert teacher.calls == 1 and r.history[-1]["train_loss"] > 0  # 64 samples: one batch of 64, once over data
    out = tmp_path / "run"
    fit(Tagger(), _padded(64), cfg, teacher=Tagger(seed=7), method="kd", out_dir=out, progress=False)
    saved = load_file(str(out / "teacher_topk.safetensors"))
    assert saved["values"].shape == (64, L, 3) and saved["codes"].shape == (64, L, 1)  # an 8-class bitmap


def test_a_method_needing_full_logits_is_refused_with_a_sparse_teacher():
    x = torch.randn(32, 5)
    y = torch.randint(0, 4, (32,))
    teacher = nn.Linear(5, 4)
    cfg = TrainConfig(epochs=1, batch_size=16, teacher_topk=2)
    with pytest.raises(ValueError, match="sparse .top-k. cached teacher gives no full logits"):
        fit(nn.Linear(5, 4), (x, y), cfg, teacher=teacher, method={"name": "dkd"}, progress=False)
    r = fit(nn.Linear(5, 4), (x, y), cfg, teacher=teacher, method={"name": "kd", "alpha": 0.5}, progress=False)
    assert r.history[-1]["train_loss"] > 0  # one label per sample: the sparse path trains too


def test_a_cache_written_by_predict_teaches_without_its_model_and_only_on_its_data(tmp_path, capsys):
    """kdistill predict --topk K --save-logits FILE on text data, then distill --teacher-logits FILE: the sparse
    cache is the teacher (the teacher model is not needed), and other data is refused naming what differs."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("in the beginning god created the heaven and the earth. and the earth was without form.\n" * 40)
    common = ["--epochs", "1", "--batch-size", "16", "--no-progress", "--set", "data.window=16"]
    assert main(["train", "--data", f"text:{corpus}", "--model", "lm:16,1,heads=2", "--out", str(tmp_path / "t"),
                 *common]) == 0
    top = tmp_path / "top8.safetensors"
    assert main(["predict", "--model", str(tmp_path / "t" / "model.safetensors"), "--topk", "8",
                 "--save-logits", str(top)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bytes_per_position"] == 8 * 2 + 8 + 2
    assert main(["distill", "--data", f"text:{corpus}", "--teacher-logits", str(top), "--student", "lm:8,1,heads=2",
                 "-T", "1", "--alpha", "0.5", "--out", str(tmp_path / "s"), *common]) == 0
    capsys.readouterr()
    assert main(["distill", "--data", f"text:{corpus}", "--teacher-logits", str(top), "--student", "lm:8,1,heads=2",
                 "--out", str(tmp_path / "s2"), *common[:-1], "data.window=12"]) == 2
    assert "data_sha256 differs" in capsys.readouterr().err
