"""Habits people bring from Keras, Lightning and Hugging Face: callbacks, early stopping, clipping,
accumulation, AdamW, and a Distiller object."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kdistill import TrainConfig, fit
from kdistill.distiller import Distiller
from kdistill.engine import Callback, EarlyStopping
from kdistill.models import build_model


def _params(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_accumulating_4_x_32_equals_one_batch_of_128(digits):
    cfg = TrainConfig(epochs=2, batch_size=128, lr=0.1, seed=1)
    a = build_model("mlp:32", digits.input_shape, 10, seed=0)
    b = copy.deepcopy(a)
    fit(a, digits.train, cfg, progress=False)
    fit(b, digits.train, TrainConfig(**{**cfg.__dict__, "accumulate": 4}), progress=False)
    assert torch.allclose(_params(a), _params(b), atol=1e-5)
    with pytest.raises(ValueError, match="train.accumulate"):
        TrainConfig(batch_size=128, accumulate=3)


def test_gradient_clipping_bounds_the_update(digits):
    # With plain SGD (no momentum) one step moves the weights by lr * clipped gradient.
    cfg = dict(epochs=1, batch_size=len(digits.train), lr=1.0, momentum=0.0, schedule="constant")
    a = build_model("mlp:16", digits.input_shape, 10, seed=0)
    start = _params(a).clone()
    fit(a, digits.train, TrainConfig(**cfg, clip_grad_norm=1e-3), progress=False)
    assert (_params(a) - start).norm() <= 1e-3 * 1.0001


def test_adamw_trains_and_differs_from_adam_with_weight_decay(digits):
    """AdamW's first step is the decoupled rule w <- w (1 - lr wd) - lr g / (|g| + eps) (Adam's first step has
    m/sqrt(v) = g/|g|), as torch.optim.AdamW takes it; Adam (decay folded into g) does not; and AdamW trains."""
    train, lr, wd = digits.train, 1e-2, 0.5
    start = build_model("mlp:16", digits.input_shape, 10, seed=0)
    grads = torch.autograd.grad(F.cross_entropy(start(train.x), train.y), list(start.parameters()))
    decoupled = torch.cat([(p.detach() * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)).flatten()
                           for p, g in zip(start.parameters(), grads)])
    ref = copy.deepcopy(start)
    for p, g in zip(ref.parameters(), grads):
        p.grad = g.clone()
    torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=wd).step()
    one_step = {}
    for opt in ("adam", "adamw"):  # one full-batch step at a constant rate
        m = copy.deepcopy(start)
        fit(m, train, TrainConfig(epochs=1, batch_size=len(train), optimizer=opt, lr=lr, weight_decay=wd,
                                  schedule="constant"), progress=False)
        one_step[opt] = _params(m)
    torch.testing.assert_close(one_step["adamw"], decoupled, atol=1e-6, rtol=0)
    torch.testing.assert_close(one_step["adamw"], _params(ref), atol=1e-6, rtol=0)
    assert (one_step["adam"] - decoupled).abs().max() > 1e-3  # wd = 0.5: the coupled rule is far off
    m = copy.deepcopy(start)
    r = fit(m, train, TrainConfig(epochs=2, optimizer="adamw", lr=lr, weight_decay=0.1), test=digits.test,
            progress=False)
    assert (_params(m) - _params(start)).abs().max() > 1e-2
    assert r.history[-1]["train_loss"] < r.history[0]["train_loss"] and r.test["accuracy"] > 0.5  # chance: 0.1


def test_callbacks_and_early_stopping(digits):
    seen = {"steps": 0, "epochs": 0}

    class Count(Callback):
        every_steps = 2

        def on_step(self, state):
            seen["steps"] += 1

        def on_epoch_end(self, state, rows):
            seen["epochs"] += 1

    stop = EarlyStopping(monitor="val_accuracy", mode="max", patience=1, min_delta=1.0)  # nothing improves by 1.0
    r = fit(build_model("mlp:16", digits.input_shape, 10, seed=0), digits.train, TrainConfig(epochs=10, batch_size=128),
            val=digits.val, callbacks=[Count(), stop], progress=False)
    assert len(r.history) == 2 and stop.stopped_epoch == 2 and seen["epochs"] == 2
    assert seen["steps"] == (len(digits.train) // 128) * 2 // 2
    with pytest.raises(ValueError, match="val_loss"):
        fit(build_model("mlp:16", digits.input_shape, 10), digits.train, TrainConfig(epochs=1),
            callbacks=[EarlyStopping(monitor="val_loss")], progress=False)


def test_distiller_fit_evaluate_save_export(digits, tmp_path):
    from kdistill.io import load_model

    teacher = build_model("mlp:64", digits.input_shape, 10, seed=0)
    fit(teacher, digits.train, TrainConfig(epochs=3), progress=False)
    d = Distiller(teacher, build_model("mlp:16", digits.input_shape, 10, seed=1), method="kd", temperature=4.0, alpha=0.9)
    result = d.fit(digits.train, epochs=3, lr=0.1, val=digits.val, progress=False)
    metrics = d.evaluate(digits.test)
    assert metrics["count"] == len(digits.test) and "teacher_agreement" in metrics
    assert result.history[-1]["loss_kd"] > 0
    back = load_model(d.save(tmp_path / "s.safetensors"))
    assert torch.equal(_params(back), _params(d.student))
    pytest.importorskip("onnx")
    assert d.export_onnx(tmp_path / "s.onnx").is_file()


def test_api_run_writes_the_cli_files_and_tensorboard(digits, tmp_path):
    import json

    out = tmp_path / "api"
    fit(build_model("mlp:16", digits.input_shape, 10), digits.train, TrainConfig(epochs=2), test=digits.test,
        out_dir=out, progress=False)
    for f in ("config.yaml", "environment.json", "results.json", "results.md", "metrics.jsonl", "metrics.csv",
              "model.safetensors", "checkpoint.safetensors"):
        assert (out / f).is_file(), f
    assert json.loads((out / "results.json").read_text())["models"]["model"]["test_errors"] >= 0
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install 'kdistill[tensorboard]')")
    from kdistill.cli.app import main

    assert main(["train", "--data", "digits", "--model", "mlp:8", "--epochs", "1", "--tensorboard", "--out",
                 str(tmp_path / "tb"), "--no-progress"]) == 0
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))


def test_every_flag_shows_a_default_and_every_command_an_example():
    from kdistill.cli.app import build_parser

    import argparse

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and "default" in action.help, (name, action.dest)
    for name in ("train", "distill", "evaluate", "run"):
        assert sub.choices[name].description and "example: kdistill" in sub.choices[name].epilog
