"""What decides a training run (:class:`TrainConfig`) and what it returns (:class:`FitResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from kdistill.config.types import closest, coerce_object, short_repr
from kdistill.data.augment import parse_augment

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "onecycle", "step")
# Upper bounds of the integer settings: far above any real run, low enough that a typo
# (epochs: 99999999999999999999999) is refused by name instead of running forever or exhausting memory.
MAX_EPOCHS = 10**6
MAX_BATCH = 2**24  # batch_size; also teacher_topk (classes)
MAX_STEPS = 10**12  # eval_every_steps
MAX_VIEWS = 10**4  # teacher_views (each is a cached logits table over the training set)
MAX_PIXELS = 2**16  # jitter
MAX_WORKERS = 1024


@dataclass
class TrainConfig:
    """Everything that decides a training run; validated before any work starts.

    ``cache_teacher`` says whether a teacher network may run once over the training data and have its
    outputs looked up by sample id, instead of running on every student batch. ``None`` (the default,
    "auto"): cache only where the data is known to give the same inputs on every read: in-memory data,
    and streamed data sets that declare no random transform and whose items read the same twice (items
    that change, e.g. an ``ImageFolder`` with ``RandomCrop``, keep the teacher live, with a warning saying
    why). ``True``: "my data is deterministic", cache it (refused, naming this field, when the data's
    items are seen to change). ``False``: always run the teacher on the student's batches. kdistill's own
    ``augment`` and ``teacher_views``, and methods reading the teacher's features, decide for themselves.
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    schedule: str = "onecycle"
    warmup: float = 0.1
    milestones: tuple[float, ...] | None = None  # schedule "step": epochs where the rate drops x0.1 (default 50%, 75%)
    max_norm: float | None = None
    clip_grad_norm: float | None = None  # clip the gradients' global L2 norm before each update
    accumulate: int = 1  # split each batch into this many micro-batches, one update per batch
    jitter: int = 0
    seed: int = 0
    # Teaching (ignored without a teacher); the method's own options (KD's temperature, alpha, kind) are the method's.
    cache_teacher: bool | None = None  # None: auto (cache only deterministic data); see the class docstring
    # Evaluation and bookkeeping.
    eval_every_steps: int = 0
    keep_best: bool = False
    checkpoint: bool = True
    device: str = "auto"
    amp: bool = True
    compile: bool = False
    cuda_graph: bool = True  # on CUDA, replay each step as one captured graph (no effect elsewhere)
    flush_denormal: bool = True  # treat subnormal floats as zero on the host while training (kdistill.engine.denormal)
    # Augmentation and cached teaching (see kdistill.data.augment and kdistill.teachers.views).
    augment: str = ""  # batched ops on the device, e.g. "crop4,flip"; `jitter: N` is the same as "cropN"
    teacher_views: int = 0  # > 0: run the teacher once on this many fixed augmented views per sample, cache them
    teacher_topk: int = 0  # store only the top-k logits of each cached view (0: all classes)
    teacher_cache: str | None = None  # file of cached views (default: OUT/teacher_views.safetensors)
    workers: int = 0  # DataLoader workers for streamed (on-disk) data

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Coerce every field to its declared type (``lr="1e-3"`` becomes 0.001; a bool is not an integer; NaN,
        infinity and magnitudes beyond :data:`kdistill.config.types.FLOAT_LIMIT` are refused), then check the values."""
        coerce_object(self, "train")

        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"train.{name}: {msg} (got {short_repr(getattr(self, name))})")

        need(isinstance(self.epochs, int) and 1 <= self.epochs <= MAX_EPOCHS, "epochs",
             f"must be an integer in [1, {MAX_EPOCHS:,}]")
        need(isinstance(self.batch_size, int) and 1 <= self.batch_size <= MAX_BATCH, "batch_size",
             f"must be an integer in [1, {MAX_BATCH:,}] (2**24)")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}")
        need(self.lr > 0, "lr", "must be > 0")
        need(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}")
        need(0 <= self.warmup < 1, "warmup", "is a fraction of the steps in [0, 1)")
        ms = self.milestones
        need(ms is None or (len(ms) > 0 and all(0 < m < self.epochs for m in ms) and list(ms) == sorted(set(ms))),
             "milestones", f"are increasing epochs strictly between 0 and epochs ({self.epochs}), or null")
        need(ms is None or self.schedule == "step", "milestones", "apply to schedule: step only; set train.schedule=step")
        need(self.max_norm is None or self.max_norm > 0, "max_norm", "must be > 0 or null")
        need(self.clip_grad_norm is None or self.clip_grad_norm > 0, "clip_grad_norm", "must be > 0 or null")
        need(isinstance(self.accumulate, int) and self.accumulate >= 1 and self.batch_size % self.accumulate == 0,
             "accumulate", f"must be an integer >= 1 that divides batch_size ({self.batch_size})")
        need(isinstance(self.jitter, int) and 0 <= self.jitter <= MAX_PIXELS, "jitter",
             f"is a pixel count in [0, {MAX_PIXELS:,}]")
        need(0 <= self.eval_every_steps <= MAX_STEPS, "eval_every_steps", f"must be in [0, {MAX_STEPS:,}]")
        need(isinstance(self.teacher_views, int) and 0 <= self.teacher_views <= MAX_VIEWS, "teacher_views",
             f"is a view count in [0, {MAX_VIEWS:,}]")
        need(isinstance(self.teacher_topk, int) and 0 <= self.teacher_topk <= MAX_BATCH, "teacher_topk",
             f"is a class count in [0, {MAX_BATCH:,}] (0: all)")
        need(isinstance(self.workers, int) and 0 <= self.workers <= MAX_WORKERS, "workers",
             f"is a process count in [0, {MAX_WORKERS}]")
        need(device_syntax_ok(self.device), "device", "must be auto, cpu, cuda, cuda:N or mps")
        need(-(2**63) <= self.seed < 2**64, "seed", "must fit in 64 bits")

        aug = parse_augment(self.augment or None)
        need(not (self.jitter and aug.pixels), "jitter", "and a crop in train.augment both translate; give one of them")
        need(not (self.teacher_views and aug.is_identity and not self.jitter), "teacher_views",
             "caches augmented views; set train.augment (e.g. crop4,flip) or leave teacher_views at 0")

    def decay_points(self) -> tuple[float, ...]:
        """Where the ``step`` schedule drops the rate x0.1, as fractions of training."""
        return tuple(m / self.epochs for m in self.milestones) if self.milestones else (0.5, 0.75)

    def augmentation(self):
        """The batched augmentation this config asks for (``jitter: N`` is ``cropN``)."""
        from dataclasses import replace as _replace

        aug = parse_augment(self.augment or None)
        return _replace(aug, crop=self.jitter) if self.jitter else aug

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """A config from a mapping (a YAML ``train:`` section): unknown keys are refused naming the closest field."""
        if not isinstance(values, dict):
            raise ValueError(f"train: must be a mapping of settings (epochs, lr, ...), got {type(values).__name__}")
        known = [f.name for f in fields(cls)]
        for key, home in MOVED_TO_METHOD.items():
            if key in values:
                raise ValueError(f"train.{key}: is an option of the method (KD) now, not of training: set {home} "
                                 f"instead (--set {home}=VALUE, or -T/--alpha/--loss on the command line)")
        for key in values:
            if key not in known:
                shown = short_repr(key, 60)  # a key pasted by mistake may be kilobytes long
                name = key if isinstance(key, str) and len(key) <= 60 else shown
                raise ValueError(f"train.{name}: unknown option {shown}{closest(key, known)}; "
                                 f"train takes {sorted(known)}")
        return cls(**values)


MOVED_TO_METHOD = {"temperature": "method.temperature", "alpha": "method.alpha", "loss": "method.kind"}
"""Settings older configs kept under ``train``: KD's options, which belong to the method."""

DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def device_syntax_ok(name: str) -> bool:
    """Whether ``name`` is ``auto`` or a device torch can parse, of a type kdistill trains on."""
    import torch

    if name == "auto":
        return True
    try:
        return torch.device(name).type in DEVICE_TYPES
    except (RuntimeError, ValueError, TypeError):
        return False


def check_device(device, field: str = "train.device") -> None:
    """Raise a ValueError naming ``field`` when ``device`` cannot be used on this machine."""
    import os

    import torch

    device = torch.device(device)
    origin = " (from $KDISTILL_DEVICE)" if os.environ.get("KDISTILL_DEVICE") == str(device) else ""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"{field}: {device}{origin} asked for, but {why}; use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{field}: {device}{origin} asked for, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"{field}: {device}{origin} asked for, but MPS is not available; use cpu or auto")
    elif device.type == "xpu":
        if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            raise ValueError(f"{field}: {device}{origin} asked for, but no XPU is available; use cpu or auto")
    elif device.type != "cpu":
        raise ValueError(f"{field}: kdistill trains on cpu, cuda, mps or xpu devices, not {device}{origin}")


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    val: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    wall_time_s: float = 0.0
    best_epoch: int | None = None
