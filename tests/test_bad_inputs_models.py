"""Bad model files (issue 27): a weights file must not run code, change its tensors' kinds, end kdistill
silently, or pass as a teacher of other classes.

* a ``py:`` spec recorded in a ``.safetensors`` file is imported only with ``--trust-code`` /
  ``trust_code=True``; one the user types (``--model py:...``) runs as before;
* ``tv:``/``timm:``/``hf:`` specs from a file never load or fetch weights or remote code;
* an integer or bool tensor is never read into a float one (or the reverse);
* a ``py:`` module that calls ``sys.exit`` is one error naming the spec, not exit 0 with no output;
* a teacher trained on classes of other names (same count) is refused naming both lists.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ecosystem import need
from kdistill.cli.app import main
from kdistill.io import load_model, save_model
from kdistill.models import build_model

SHAPE, CLASSES = (1, 4, 4), 3
HELPER = textwrap.dedent('''
    import math
    from pathlib import Path
    from torch import nn

    Path(__file__).with_name("ran").write_text("imported")  # what an attacker's code would do: anything

    def make(in_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), num_classes))
''')


def _npz(tmp_path, classes=("ant", "bee", "cow"), name="d.npz") -> str:
    rng = np.random.default_rng(0)
    y = np.arange(30) % 3
    x = rng.random((30, *SHAPE), dtype=np.float32) + y[:, None, None, None]
    np.savez(tmp_path / name, x_train=x[:21], y_train=y[:21], x_test=x[21:], y_test=y[21:], classes=np.array(classes))
    return f"npz:{tmp_path / name}"


def _file_with_spec(tmp_path, spec: str, name: str = "w.safetensors"):
    """A weights file whose metadata names ``spec``: the weights of what the helper's ``make`` builds."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, CLASSES))
    meta = {"spec": spec, "in_shape": list(SHAPE), "num_classes": CLASSES, "class_names": ["ant", "bee", "cow"]}
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata={"kdistill": json.dumps(meta)})
    return path


def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err


# ----------------------------------------------------------------------------------------- code in a file

def test_py_spec_in_a_weights_file_is_not_imported(tmp_path, capsys):
    (tmp_path / "helper.py").write_text(HELPER)
    spec = f"py:{tmp_path / 'helper.py'}:make"
    weights = _file_with_spec(tmp_path, spec)
    data = _npz(tmp_path)
    for argv in (["evaluate", "--model", str(weights), "--data", data],
                 ["distill", "--data", data, "--teacher", str(weights), "--student", "mlp:4", "--epochs", "1",
                  "--no-progress", "--out", str(tmp_path / "s")],
                 ["export-onnx", "--model", str(weights), "--onnx", str(tmp_path / "m.onnx")]):
        err = _error(capsys, argv)
        assert "--trust-code" in err and "trust_code=True" in err and repr(spec) in err, err
    with pytest.raises(ValueError, match="trust_code=True"):
        load_model(weights)
    assert not (tmp_path / "ran").exists() and not (tmp_path / "s").exists()

    # opted in: the code runs and the model is rebuilt
    model = load_model(weights, trust_code=True)
    assert (tmp_path / "ran").exists() and model(torch.zeros(2, *SHAPE)).shape == (2, CLASSES)
    capsys.readouterr()
    assert main(["evaluate", "--model", str(weights), "--data", data, "--trust-code"]) == 0


def test_py_spec_naming_an_installed_module_is_not_imported(tmp_path, monkeypatch):
    (tmp_path / "kd_h2_installed_mod.py").write_text(HELPER)
    monkeypatch.syspath_prepend(str(tmp_path))
    weights = _file_with_spec(tmp_path, "py:kd_h2_installed_mod:make")
    with pytest.raises(ValueError, match=r"'py:kd_h2_installed_mod:make'.*--trust-code"):
        load_model(weights)
    assert not (tmp_path / "ran").exists()
    checkpoint = tmp_path / "checkpoint.safetensors"  # a checkpoint's recorded spec is the file's too
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, CLASSES))
    save_file({f"model.{k}": v.contiguous() for k, v in net.state_dict().items()}, str(checkpoint),
              metadata={"kdistill_checkpoint": json.dumps({"spec": "py:kd_h2_installed_mod:make"})})
    with pytest.raises(ValueError, match="--trust-code"):
        load_model(checkpoint, in_shape=SHAPE, num_classes=CLASSES)
    assert not (tmp_path / "ran").exists()


def test_a_spec_the_user_gives_runs_as_before(tmp_path):
    (tmp_path / "helper.py").write_text(HELPER)
    weights = _file_with_spec(tmp_path, "mlp:4")  # the file says one thing, the user names the model
    model = load_model(weights, spec=f"py:{tmp_path / 'helper.py'}:make", in_shape=SHAPE, num_classes=CLASSES)
    assert (tmp_path / "ran").exists() and model(torch.zeros(1, *SHAPE)).shape == (1, CLASSES)


@pytest.mark.parametrize("spec, match", [
    ("timm:resnet18,checkpoint_path=/tmp/evil.pth", "option 'checkpoint_path' is refused"),
    ("timm:resnet18,pretrained=true", "option 'pretrained' is refused"),
    ("tv:resnet18,weights=DEFAULT", "option 'weights' is refused"),
    ("tv:fasterrcnn_resnet50_fpn,weights_backbone=DEFAULT", "option 'weights_backbone' is refused"),
    ("hf:bert,trust_remote_code=true", "option 'trust_remote_code' is refused"),
    ("hf:bert,revision=main", "option 'revision' is refused"),
])
def test_library_specs_in_a_file_never_load_or_fetch(tmp_path, spec, match):
    weights = _file_with_spec(tmp_path, spec)  # refused before the library is even imported
    with pytest.raises(ValueError, match=match):
        load_model(weights)


@pytest.mark.ecosystem
def test_an_hf_config_with_remote_code_is_refused(tmp_path):
    need("transformers")
    path = _file_with_spec(tmp_path, "hf:evil_arch,task=sequence-classification")
    meta = {"spec": "hf:evil_arch,task=sequence-classification", "in_shape": [8], "num_classes": 3,
            "hf_config": {"model_type": "evil_arch", "auto_map": {"AutoConfig": "evil.Config",
                                                                  "AutoModelForSequenceClassification": "evil.Model"}}}
    save_file({"w": torch.zeros(1)}, str(path), metadata={"kdistill": json.dumps(meta)})
    with pytest.raises(ValueError, match="'evil_arch' is not built into transformers.*remote code is never run"):
        load_model(path)


# -------------------------------------------------------------------------------------------- dtypes

def _resnet_state():
    model = build_model("resnet8", (3, 8, 8), CLASSES, seed=0)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("key, dtype", [
    ("bn1.num_batches_tracked", torch.float32),  # an int64 step count stored as float: was cast silently
    ("conv1.weight", torch.int32),  # float weights stored as integers: were cast silently
    ("fc.bias", torch.bool),
])
def test_tensor_kinds_are_never_cast(tmp_path, key, dtype):
    model, state = _resnet_state()
    state[key] = state[key].to(dtype)
    save_file(state, str(tmp_path / "w.safetensors"),
              metadata={"kdistill": json.dumps({"spec": "resnet8", "in_shape": [3, 8, 8], "num_classes": CLASSES})})
    with pytest.raises(ValueError, match=rf"dtype mismatch \(file vs model\): {key} "
                                         rf"{str(dtype)[6:]} vs {str(model.state_dict()[key].dtype)[6:]}"):
        load_model(tmp_path / "w.safetensors")


def test_float_precision_may_change_and_integers_keep_their_values(tmp_path):
    model, state = _resnet_state()
    state["bn1.num_batches_tracked"] = torch.tensor(7)
    state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(tmp_path / "w.safetensors"),
              metadata={"kdistill": json.dumps({"spec": "resnet8", "in_shape": [3, 8, 8], "num_classes": CLASSES})})
    again = load_model(tmp_path / "w.safetensors")
    assert again.state_dict()["bn1.num_batches_tracked"].dtype == torch.int64
    assert int(again.state_dict()["bn1.num_batches_tracked"]) == 7
    assert again.state_dict()["conv1.weight"].dtype == torch.float32


# ------------------------------------------------------------------------------------------ sys.exit

EXITS = textwrap.dedent('''
    import sys
    sys.exit({code})

    def make(in_shape, num_classes):
        pass
''')
EXITS_IN_FACTORY = textwrap.dedent('''
    import sys

    def make(in_shape, num_classes):
        sys.exit("bye")
''')


@pytest.mark.parametrize("source", [EXITS.format(code=0), EXITS.format(code=3), EXITS_IN_FACTORY])
def test_sys_exit_in_user_code_is_an_error_naming_the_spec(tmp_path, capsys, source):
    (tmp_path / "quits.py").write_text(source)
    spec = f"py:{tmp_path / 'quits.py'}:make"
    err = _error(capsys, ["train", "--data", _npz(tmp_path), "--model", spec, "--epochs", "1", "--no-progress",
                          "--out", str(tmp_path / "run")])
    assert repr(spec) in err and "sys.exit" in err, err
    assert not (tmp_path / "run").exists()
    weights = _file_with_spec(tmp_path, spec)
    with pytest.raises(ValueError, match="sys.exit"):
        load_model(weights, trust_code=True)


# --------------------------------------------------------------------------------------- class names

def test_a_teacher_of_other_class_names_is_refused(tmp_path, capsys):
    teacher_data = _npz(tmp_path, ("ant", "bee", "cow"), "teacher.npz")
    assert main(["train", "--data", teacher_data, "--model", "mlp:8", "--epochs", "1", "--no-progress",
                 "--out", str(tmp_path / "t")]) == 0
    teacher = str(tmp_path / "t" / "model.safetensors")
    for classes, how in ((("cat", "dog", "emu"), "other names"), (("bee", "ant", "cow"), "in another order")):
        name = f"{classes[0]}.npz"
        err = _error(capsys, ["distill", "--data", _npz(tmp_path, classes, name), "--teacher", teacher,
                              "--student", "mlp:4", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "s")])
        assert "['ant', 'bee', 'cow']" in err and str(list(classes)) in err and how in err, err
        assert not (tmp_path / "s").exists()
    capsys.readouterr()  # the same names: accepted
    assert main(["distill", "--data", _npz(tmp_path, ("ant", "bee", "cow"), "same.npz"), "--teacher", teacher,
                 "--student", "mlp:4", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "s")]) == 0


def test_teacher_model_with_teacher_weights_checks_the_class_names_the_file_records(tmp_path, capsys):
    """--teacher-model SPEC --teacher-weights FILE builds the net from the spec, but the file still records the
    classes it was trained on: a permuted order is refused as it is for --teacher."""
    assert main(["train", "--data", _npz(tmp_path, ("ant", "bee", "cow"), "t.npz"), "--model", "mlp:8", "--epochs",
                 "1", "--no-progress", "--out", str(tmp_path / "t")]) == 0
    weights = str(tmp_path / "t" / "model.safetensors")
    args = ["distill", "--teacher-model", "mlp:8", "--teacher-weights", weights, "--student", "mlp:4", "--epochs", "1",
            "--no-progress", "--out", str(tmp_path / "s")]
    err = _error(capsys, args + ["--data", _npz(tmp_path, ("bee", "ant", "cow"), "b.npz")])
    assert "in another order" in err and "['ant', 'bee', 'cow']" in err, err
    assert not (tmp_path / "s").exists()
    capsys.readouterr()
    assert main(args + ["--data", _npz(tmp_path, ("ant", "bee", "cow"), "same.npz")]) == 0
