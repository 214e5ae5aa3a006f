"""Bring your own model and data: the teacher sees the student's exact batches, any model output works, and
integer or keyword inputs reach the model as they are.

The tests marked ``ecosystem`` use the real packages (a torchvision ``ImageFolder`` over PNGs written here,
tiny Hugging Face models built from a config); the others need only torch.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from ecosystem import need
from torch import nn

from kdistill import TrainConfig, fit
from kdistill.data.convert import as_split
from kdistill.data.dataset import TensorData
from kdistill.data.stream import changing_items
from kdistill.engine.evaluate import evaluate_model

# --------------------------------------------------------------------------------------------- helpers


def _pngs(root, per_class: int = 8, size: int = 32, seed: int = 0) -> None:
    """Tiny RGB PNGs in ``root/{red,blue}/``: noise around a class colour (an easy two-class task)."""
    from PIL import Image

    g = np.random.default_rng(seed)
    for c, colour in enumerate(((200, 40, 40), (40, 40, 200))):
        (root / ("red", "blue")[c]).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(g.normal(colour, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / ("red", "blue")[c] / f"{i}.png")


def _conv(seed: int, classes: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, classes))


class _Inputs:
    """Records every input a module's forward receives (``training_only``: only in training mode), also in
    the shared ``log`` as ``(name, inputs)``, so two modules' calls can be read in the order they came."""

    def __init__(self, module: nn.Module, training_only: bool = False, log: list | None = None,
                 name: str = "") -> None:
        self.seen: list = []
        self.training_only, self.log, self.name = training_only, log, name
        self.handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        if not self.training_only or module.training:
            x = args[0] if args else kwargs
            x = {k: v.clone() for k, v in x.items()} if isinstance(x, dict) else x.clone()
            self.seen.append(x)
            if self.log is not None:
                self.log.append((self.name, x))


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return torch.equal(a, b)


def _teacher_follows_student(log: list) -> int:
    """Check that every training forward of the student ("s") is followed by one teacher forward ("t") on
    the same inputs, and that the teacher ran otherwise only for fit's one-sample dry forward before
    training; return the number of steps."""
    first = next(i for i, (who, _) in enumerate(log) if who == "s")
    before = [x for who, x in log[:first] if who == "t"]
    assert len(before) <= 1 and all(len(next(iter(x.values())) if isinstance(x, dict) else x) == 1 for x in before)
    pairs = log[first:]
    assert len(pairs) % 2 == 0 and [who for who, _ in pairs] == ["s", "t"] * (len(pairs) // 2)
    assert all(_same(pairs[i][1], pairs[i + 1][1]) for i in range(0, len(pairs), 2))  # same pixels / token ids
    return len(pairs) // 2


def _cache_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "cache_teacher" in str(w.message)]


# ------------------------------------------------------------------ 1. the teacher sees the student's batch


@pytest.mark.ecosystem
def test_random_imagefolder_teacher_sees_exactly_the_students_batches(tmp_path):
    tv = need("torchvision")
    T = tv.transforms
    _pngs(tmp_path)
    train = tv.datasets.ImageFolder(tmp_path, transform=T.Compose(
        [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()]))
    student, teacher = _conv(0), _conv(1)
    log: list = []
    s_in, _ = _Inputs(student, True, log, "s"), _Inputs(teacher, False, log, "t")
    with pytest.warns(UserWarning, match=r"change between reads \(its transform RandomCrop is random\)"):
        fit(student, train, TrainConfig(epochs=2, batch_size=4, lr=0.01, device="cpu"), teacher=teacher,
            progress=False)
    steps = 2 * len(train) // 4
    assert _teacher_follows_student(log) == steps  # the teacher ran on every student batch: no cache
    first, second = torch.cat(s_in.seen[: steps // 2]), torch.cat(s_in.seen[steps // 2:])
    assert first.shape == second.shape and not torch.equal(first.sum((1, 2, 3)).sort().values,
                                                           second.sum((1, 2, 3)).sort().values)  # views changed


@pytest.mark.ecosystem
def test_random_imagefolder_forced_cache_is_refused_naming_the_field(tmp_path):
    tv = need("torchvision")
    T = tv.transforms
    _pngs(tmp_path, per_class=3)
    train = tv.datasets.ImageFolder(tmp_path, transform=T.Compose([T.RandomHorizontalFlip(), T.ToTensor()]))
    student, teacher, log = _conv(0), _conv(1), []
    s_in, calls = _Inputs(student, True, log, "s"), _Inputs(teacher, False, log, "t")
    with pytest.raises(ValueError, match=r"train\.cache_teacher: true caches.*RandomHorizontalFlip.*set it to false"):
        fit(student, train, TrainConfig(epochs=1, batch_size=2, device="cpu", cache_teacher=True), teacher=teacher,
            progress=False)
    assert calls.seen == [] and s_in.seen == []  # refused before any work
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = fit(student, train, TrainConfig(epochs=1, batch_size=2, device="cpu", cache_teacher=False),
                  teacher=teacher, progress=False)  # said explicitly: live, no probing, no warning
    assert _cache_warnings(record) == [] and _teacher_follows_student(log) == out.history[-1]["step"] == 3


@pytest.mark.ecosystem
def test_deterministic_imagefolder_and_memory_data_cache_the_teacher_in_one_pass(tmp_path):
    tv = need("torchvision")
    _pngs(tmp_path)
    plain = tv.datasets.ImageFolder(tmp_path, transform=tv.transforms.ToTensor())
    assert changing_items(as_split(plain)) is None
    in_memory = TensorData(torch.stack([plain[i][0] for i in range(len(plain))]), torch.tensor(plain.targets),
                           tuple(plain.classes))
    for data in (plain, in_memory):
        teacher = _conv(1)
        calls = _Inputs(teacher)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            fit(_conv(0), data, TrainConfig(epochs=2, batch_size=4, device="cpu"), teacher=teacher, progress=False)
        assert _cache_warnings(record) == []
        assert len(calls.seen) == 1 and len(calls.seen[0]) == len(plain)  # one pass over every sample, cached


def test_items_that_change_between_reads_are_detected_without_a_declared_transform():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return torch.rand(3) + i, i % 2

    data = as_split(Noisy())
    before = torch.get_rng_state()
    assert changing_items(data) == "reading item 0 twice gave different inputs"
    assert torch.equal(torch.get_rng_state(), before)  # probing leaves the run's random draws alone


def test_cache_teacher_is_tri_state_in_the_config():
    assert TrainConfig().cache_teacher is None  # auto
    assert TrainConfig.from_dict({"cache_teacher": None}).cache_teacher is None  # YAML `cache_teacher: null`
    assert TrainConfig.from_dict({"cache_teacher": "true"}).cache_teacher is True  # --set train.cache_teacher=true
    assert TrainConfig(cache_teacher=False).cache_teacher is False
    with pytest.raises(ValueError, match=r"train\.cache_teacher: must be true or false or null"):
        TrainConfig.from_dict({"cache_teacher": "sometimes"})


# ------------------------------------------------------------------------------- 2. what a model returns


class _Outputs(nn.Module):
    """A linear classifier whose forward returns ``kind``: a dict, a (logits, features) tuple or a tensor."""

    def __init__(self, kind: str, seed: int, features: int = 6, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.kind, self.body, self.head = kind, nn.Linear(features, 8), nn.Linear(8, classes)

    def forward(self, x):
        h = torch.relu(self.body(x))
        z = self.head(h)
        return {"logits": z, "hidden": h} if self.kind == "dict" else (z, h) if self.kind == "tuple" else z


def _blobs(n: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    return torch.randn(n, 6, generator=g) * 0.3 + nn.functional.one_hot(y, 6).float() * 2, y


@pytest.mark.parametrize("kind", ["dict", "tuple"])
def test_dict_and_tuple_outputs_train_with_a_teacher_and_evaluate(kind):
    x, y = _blobs()
    teacher = fit(_Outputs(kind, 1), (x, y), TrainConfig(epochs=8, batch_size=16, lr=0.1, device="cpu"),
                  progress=False).model
    out = fit(_Outputs(kind, 2), (x, y), TrainConfig(epochs=8, batch_size=16, lr=0.1, device="cpu",
                                                     cache_teacher=False),  # live: the teacher also rates val
              teacher=teacher, val=(x, y), progress=False)
    assert out.history[-1]["val_accuracy"] > 0.9 and out.history[-1]["val_teacher_agreement"] > 0.9
    assert evaluate_model(out.model, as_split((x, y)))["accuracy"] > 0.9
    assert isinstance(out.model(x), dict if kind == "dict" else tuple)  # the user's module is left as it was
    with pytest.raises(ValueError, match=r"model: outputs \(1, 3\) for one sample, but train has 4 classes"):
        fit(_Outputs(kind, 3), (x, torch.arange(len(x)) % 4), progress=False)


# ----------------------------------------------------------------------------------- 3. integer inputs


class _Bag(nn.Module):
    """Mean of token embeddings, then a linear head: needs int64 token ids."""

    def __init__(self, seed: int, vocab: int = 50, classes: int = 2) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.head = nn.EmbeddingBag(vocab, 8), nn.Linear(8, classes)

    def forward(self, ids):
        return self.head(self.emb(ids))


def _tokens(n: int = 64, length: int = 6, seed: int = 0):
    """Class 0 draws tokens 1..24, class 1 tokens 25..49: learnable from any one token."""
    g = np.random.default_rng(seed)
    y = np.arange(n) % 2
    ids = np.where(y[:, None] == 0, g.integers(1, 25, (n, length)), g.integers(25, 50, (n, length)))
    return ids.astype(np.int64), y


def test_int64_token_ids_stay_integers_in_memory_streamed_and_for_the_cached_teacher():
    ids, y = _tokens()
    assert as_split((ids, y)).x.dtype == torch.long
    assert as_split((np.full((2, 1, 2, 2), 255, np.uint8), [0, 1])).x.dtype == torch.float32  # pixels: scaled
    cfg = TrainConfig(epochs=6, batch_size=16, lr=0.5, device="cpu")
    teacher = fit(_Bag(1), (ids, y), cfg, progress=False).model
    calls = _Inputs(teacher)
    out = fit(_Bag(2), (ids, y), cfg, teacher=teacher, val=(ids, y), progress=False)
    assert len(calls.seen) == 1 and calls.seen[0].dtype == torch.long  # one cached pass over the ids
    assert out.val["accuracy"] > 0.9

    class Streamed(torch.utils.data.Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return ids[i], int(y[i])

    calls.seen.clear()
    out = fit(_Bag(3), Streamed(), cfg, teacher=teacher, progress=False, test=Streamed())
    assert calls.seen[0].dtype == torch.long and out.test["accuracy"] > 0.9
    with pytest.raises(ValueError, match=r"inputs shaped \(6,\) int64.*integer inputs stay integers.*float32"):
        fit(nn.Linear(6, 2), (ids, y), cfg, progress=False)


# ------------------------------------------------------------------------ transformers: ids and dicts


def _bert(seed: int, labels: int = 2):
    transformers = need("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=labels)
    return transformers.AutoModelForSequenceClassification.from_config(config)


class _Sentences(torch.utils.data.Dataset):
    """``({"input_ids", "attention_mask"}, label)`` items of padded token-id sentences (class = token range)."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        ids, self.y = _tokens(n, length=8, seed=seed)
        self.lengths = 4 + np.arange(n) % 5
        self.ids = np.where(np.arange(8)[None] < self.lengths[:, None], ids + 2, 0)  # 0 is padding

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        mask = (np.arange(8) < self.lengths[i]).astype(np.int64)
        return {"input_ids": torch.as_tensor(self.ids[i]), "attention_mask": torch.as_tensor(mask)}, int(self.y[i])


@pytest.mark.ecosystem
def test_transformers_text_classifier_distils_from_a_teacher_on_dict_batches():
    train, test = _Sentences(seed=0), _Sentences(seed=1)
    cfg = TrainConfig(epochs=6, batch_size=16, optimizer="adamw", lr=3e-3, device="cpu")
    teacher = fit(_bert(0), train, cfg, progress=False).model
    student, log = _bert(1), []
    s_in, _ = _Inputs(student, True, log, "s"), _Inputs(teacher, False, log, "t")
    out = fit(student, train, TrainConfig(epochs=6, batch_size=16, optimizer="adamw", lr=3e-3, device="cpu",
                                          cache_teacher=False), teacher=teacher, test=test, progress=False)
    assert out.test["accuracy"] > 0.9
    assert _teacher_follows_student(log) == out.history[-1]["step"]  # the same dict of ids, batch for batch
    assert all(s["input_ids"].dtype == torch.long and s.keys() == {"input_ids", "attention_mask"} for s in s_in.seen)
    assert evaluate_model(out.model, as_split(test))["accuracy"] == out.test["accuracy"]
    one = {k: v[None] for k, v in train[0][0].items()}
    assert type(out.model(**one)).__name__ == "SequenceClassifierOutput"  # the module is handed back unchanged
    with pytest.raises(ValueError, match=r"model: outputs \(1, 3\) for one sample, but train has 2 classes"):
        fit(_bert(2, labels=3), train, cfg, progress=False)


# ------------------------------------------------ the README's "Bring your own model and data", verbatim


@pytest.mark.ecosystem
def test_readme_imagefolder_with_random_transforms(tmp_path):
    tv = need("torchvision")
    for split, seed in (("train", 0), ("test", 1)):
        _pngs(tmp_path / split, per_class=8, seed=seed)
    root = tmp_path  # the README reads Path("data")
    datasets, T, models = tv.datasets, tv.transforms, tv.models
    # --- README snippet begins
    augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    train = datasets.ImageFolder(root / "train", transform=augment)
    test = datasets.ImageFolder(root / "test", transform=T.ToTensor())

    teacher = models.resnet18(num_classes=len(train.classes))  # in practice: your trained network
    student = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(16, len(train.classes)))
    result = fit(student, train, TrainConfig(epochs=2, batch_size=8, lr=0.05), teacher=teacher, test=test)
    print(result.test["accuracy"])
    # --- README snippet ends
    assert result.test["count"] == len(test) and 0.0 <= result.test["accuracy"] <= 1.0
    assert len(result.history) == 2 and np.isfinite(result.history[-1]["train_loss"])


class Sentences(torch.utils.data.Dataset):
    """Items ``({"input_ids", "attention_mask"}, label)``: the model is called as ``model(**inputs)``."""

    def __init__(self, input_ids, attention_mask, labels):
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i]}, int(self.labels[i])


def _encoded(seed: int):
    """What a tokenizer gives for 64 padded sentences (``input_ids``, ``attention_mask``) and their labels."""
    data = _Sentences(seed=seed)
    mask = torch.as_tensor(np.arange(8)[None] < data.lengths[:, None]).long()
    return {"input_ids": torch.as_tensor(data.ids), "attention_mask": mask}, torch.as_tensor(data.y)


@pytest.mark.ecosystem
def test_readme_transformers_token_ids():
    transformers = need("transformers")
    AutoModelForSequenceClassification, BertConfig = transformers.AutoModelForSequenceClassification, \
        transformers.BertConfig
    (enc, labels), (test_enc, test_labels) = _encoded(0), _encoded(1)
    torch.manual_seed(0)
    # --- README snippet begins
    train = Sentences(enc["input_ids"], enc["attention_mask"], labels)
    test = Sentences(test_enc["input_ids"], test_enc["attention_mask"], test_labels)

    config = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=2)
    cfg = TrainConfig(epochs=6, batch_size=16, optimizer="adamw", lr=3e-3)
    teacher = fit(AutoModelForSequenceClassification.from_config(config), train, cfg).model  # or your fine-tuned one
    student = AutoModelForSequenceClassification.from_config(config)
    result = fit(student, train, cfg, teacher=teacher, test=test)
    print(result.test["accuracy"])

    # Token ids held in memory (int64 stays int64) take the fast path; the model gets them positionally.
    result = fit(AutoModelForSequenceClassification.from_config(config), (enc["input_ids"], labels), cfg,
                 teacher=teacher, test=(test_enc["input_ids"], test_labels))
    # --- README snippet ends
    assert result.test["accuracy"] > 0.9
