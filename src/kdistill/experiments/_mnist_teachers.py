"""Teachers shared by several MNIST experiments: trained once, cached by their settings, reloaded after.

transfer-omit3, transfer-keep78, small-student and soft-labels all start from a teacher trained on the
full training split (validation carved off). Training a CNN teacher takes minutes on a CPU, so each one
is saved (safetensors) under a cache folder, in a sub-folder named by a hash of everything that decides
it: the model spec, the training settings and the exact training sample ids. A run with the same
settings reloads it instead of retraining; anything else trains a new one. ``cache="none"`` disables this.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from kdistill.data.dataset import TensorData
from kdistill.engine.evaluate import classification_metrics, predict_logits
from kdistill.io import load_model, save_model, write_json
from kdistill.models import build_model
from kdistill.engine import TrainConfig, fit
from kdistill.experiments import RunContext


TEACHER_SETTINGS: dict[str, Any] = {
    "seed": 0,
    "val_size": 5000,
    "batch_size": 128,
    "teacher_jitter": 2,
    "teacher_lr": 0.05,
    "teacher_weight_decay": 5e-4,
    "teacher_cache": "auto",
}
"""Settings every experiment sharing these teachers starts from: one source, so their cache keys agree."""


@dataclass(frozen=True)
class TeacherRecipe:
    """How a teacher is trained (the cache key hashes this and the training data's ids and shape)."""

    spec: str
    epochs: int
    lr: float = 0.05
    weight_decay: float = 5e-4
    jitter: int = 2
    batch_size: int = 128
    seed: int = 0

    def config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           weight_decay=self.weight_decay, jitter=self.jitter, seed=self.seed)


def cache_dir(setting: str | None, out: Path) -> Path | None:
    """``"auto"``: a ``teacher-cache`` folder beside the run's output folder; ``"none"``/empty: no cache."""
    if setting in (None, "", "none", "null"):
        return None
    return out.parent / "teacher-cache" if setting == "auto" else Path(setting)


def recipe_key(recipe: TeacherRecipe, train: TensorData) -> str:
    h = hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode())
    h.update(json.dumps([list(train.x.shape), train.num_classes]).encode())
    h.update(train.index.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def get_teacher(
    recipe: TeacherRecipe, train: TensorData, val: TensorData, test: TensorData, ctx: RunContext, cache: Path | None
) -> tuple[nn.Module, dict[str, Any]]:
    """A trained teacher for ``recipe`` on ``train`` (from ``cache`` if there) and its record.

    The record holds the test metrics (recomputed, so a cached teacher is checked, not trusted), the
    training wall time of the run that trained it and whether this call loaded it from the cache.
    """
    key = recipe_key(recipe, train)
    folder = cache / f"{recipe.spec.replace(':', '_').replace(',', '-')}-{key}" if cache else None
    weights = folder / "model.safetensors" if folder else None
    if weights is not None and weights.is_file():
        model = load_model(weights)
        meta = json.loads((folder / "teacher.json").read_text())
        ctx.log(f"teacher {recipe.spec}: loaded from {folder} (trained in {meta['train_wall_time_s']:.0f} s)")
        cached = True
    else:
        ctx.log(f"teacher {recipe.spec}: training {recipe.epochs} epochs, jitter ±{recipe.jitter} px")
        model = build_model(recipe.spec, train.input_shape, train.num_classes, seed=recipe.seed)
        result = fit(model, train, recipe.config(), val=val, progress=ctx.progress)
        meta = {"recipe": asdict(recipe), "key": key, "train_wall_time_s": round(result.wall_time_s, 2)}
        if folder is not None:
            save_model(weights, model, in_shape=list(train.input_shape), num_classes=train.num_classes)
            write_json(folder / "teacher.json", meta)
        cached = False
    model.eval()
    test_metrics = classification_metrics(predict_logits(model, test.x), test.y)
    val_metrics = classification_metrics(predict_logits(model, val.x), val.y, detailed=False)
    ctx.log(f"teacher {recipe.spec}: {test_metrics['errors']} test errors, {val_metrics['errors']} validation errors")
    record = {"spec": recipe.spec, "recipe": asdict(recipe), "cache_key": key, "loaded_from_cache": cached,
              "train_wall_time_s": meta["train_wall_time_s"], "test": test_metrics, "val_errors": val_metrics["errors"]}
    return model, record
