"""Finished units of a long experiment (a teacher, one student's record), kept as they land.

A full profile can outlast the session or machine it started on. Experiments that train many models one
after another store each finished one under ``OUT/progress/``: its record as JSON and, where a later step
needs the model (a teacher the students learn from, a model in the deployment table), its weights as
safetensors. ``kdistill run ... --resume`` (``run_experiment(resume=True)``) reruns the experiment in the
same folder with the same settings and takes every stored unit instead of training it again; since each
unit is seeded on its own, the resumed run's numbers are the uninterrupted run's. A run without
``--resume`` starts with an empty store, so nothing stale is ever reused.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from kdistill.io import load_weights, save_model, write_json

_ELAPSED = "_elapsed.json"
_SAFE = re.compile(r"[^A-Za-z0-9_.=+-]+")


class Progress:
    """Records and weights of finished units under ``root``, looked up by a key such as ``"pair/kd/seed1"``."""

    def __init__(self, root: Path, *, resume: bool) -> None:
        self.root = Path(root)
        if not resume and self.root.exists():
            shutil.rmtree(self.root)  # a fresh run: an earlier run's units must not be mistaken for this one's
        self.resumed: list[str] = []
        elapsed = self.root / _ELAPSED
        self.prior_s = float(json.loads(elapsed.read_text())["elapsed_s"]) if elapsed.is_file() else 0.0
        """Seconds the earlier attempt had run when it stored its last unit (0 for a fresh run)."""

    def _path(self, key: str, suffix: str) -> Path:
        return self.root / (_SAFE.sub("_", key) + suffix)

    def record(self, key: str) -> dict[str, Any] | None:
        """The stored record of ``key``, or None when that unit has not finished."""
        path = self._path(key, ".json")
        if not path.is_file():
            return None
        self.resumed.append(key)
        return json.loads(path.read_text())

    def save(self, key: str, record: dict[str, Any], model: nn.Module | None = None, elapsed_s: float = 0.0) -> None:
        """Store ``record`` (and ``model``'s weights) for ``key``; the weights land first, so a record on
        disk always has its weights. ``elapsed_s``: the run's wall time so far, kept for a resumed run."""
        self.root.mkdir(parents=True, exist_ok=True)
        if key in self.resumed:  # its record was read but the unit trained again (its weights were missing)
            self.resumed.remove(key)
        if model is not None:
            save_model(self._path(key, ".safetensors"), model)
        write_json(self._path(key, ".json"), record)
        write_json(self.root / _ELAPSED, {"elapsed_s": round(float(elapsed_s), 2)})

    def load_into(self, key: str, model: nn.Module) -> bool:
        """Load ``key``'s stored weights into ``model`` (built the same way); False when none were stored."""

        path = self._path(key, ".safetensors")
        if not path.is_file():
            return False
        state, _ = load_weights(path)
        model.load_state_dict(state)
        return True
