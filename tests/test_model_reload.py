"""A run's ``model.safetensors`` rebuilds models of every family: timm, torchvision, transformers (issue 26).

Each model is made with its own library (``timm.create_model``, a torchvision builder, ``AutoModelFor...``),
trained through the Python API (``kdistill.fit`` with ``out_dir``), and its file then used by the command
line: ``kdistill evaluate --model``, ``kdistill export-onnx`` and as ``--teacher`` of ``kdistill distill``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import kdistill
from ecosystem import need
from kdistill.cli.app import main
from kdistill.data import load
from kdistill.io import load_model, read_model_meta, save_model
from kdistill.models import build_model
from kdistill.models.adapters import describe_model
from kdistill.models.outputs import logits_of

CLASSES = ("ant", "bee", "cow")
BERT = "vocab_size=40,hidden_size=16,num_hidden_layers=1,num_attention_heads=2,intermediate_size=32," \
       "max_position_embeddings=16"


def _images(tmp_path, channels: int = 3) -> str:
    rng = np.random.default_rng(0)
    y = np.arange(36) % 3
    x = rng.random((36, channels, 16, 16), dtype=np.float32) * 0.2 + y[:, None, None, None] * 0.3
    np.savez(tmp_path / "img.npz", x_train=x[:24], y_train=y[:24], x_test=x[24:], y_test=y[24:],
             classes=np.array(CLASSES))
    return f"npz:{tmp_path / 'img.npz'}"


def _tokens(tmp_path) -> str:
    rng = np.random.default_rng(1)
    y = np.arange(36) % 3
    x = rng.integers(3, 40, size=(36, 8))
    x[:, 0] = y  # the class shows in the first token
    np.savez(tmp_path / "tok.npz", x_train=x[:24], y_train=y[:24], x_test=x[24:], y_test=y[24:],
             classes=np.array(CLASSES))
    return f"npz:{tmp_path / 'tok.npz'}"


def _fit(model, data: str, out) -> None:
    bundle = load(data)
    kdistill.fit(model, bundle.train, kdistill.TrainConfig(epochs=1, batch_size=8, lr=0.01), out_dir=out,
                 progress=False)


def _cli(capsys, *argv: str) -> dict:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1]) if captured.out.strip().startswith("{") else {}


def _round_trip(model, data: str, tmp_path, capsys, spec: str) -> None:
    """fit → the file's spec is ``spec``; evaluate, export-onnx and --teacher all rebuild the model from it."""
    run = tmp_path / "run"
    _fit(model, data, run)
    weights = str(run / "model.safetensors")
    meta = read_model_meta(weights)
    assert meta["spec"] == spec
    model.eval()
    again = load_model(weights).eval()
    x = load(data).test.x[:4]
    with torch.no_grad():
        want = logits_of(model(x))
        assert torch.allclose(again(x), want, atol=1e-5)

    capsys.readouterr()
    assert main(["evaluate", "--model", weights, "--data", data]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 12

    onnx = tmp_path / "m.onnx"
    assert main(["export-onnx", "--model", weights, "--onnx", str(onnx)]) == 0
    ort = need("onnxruntime")
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.allclose(got, want.numpy(), atol=1e-4)

    capsys.readouterr()
    assert main(["distill", "--data", data, "--teacher", weights, "--student", "mlp:8", "--epochs", "1",
                 "--batch-size", "8", "--no-progress", "--out", str(tmp_path / "student")]) == 0
    assert (tmp_path / "student" / "model.safetensors").is_file()


@pytest.mark.ecosystem
def test_timm_model_trained_through_the_api_reloads(tmp_path, capsys):
    timm = need("timm")
    model = timm.create_model("test_resnet", num_classes=3)  # was recorded as py:timm.models.resnet:ResNet
    _round_trip(model, _images(tmp_path), tmp_path, capsys, "timm:test_resnet")


@pytest.mark.ecosystem
def test_timm_in_chans_comes_from_the_data(tmp_path):
    timm = need("timm")
    model = timm.create_model("test_resnet", num_classes=3, in_chans=1)
    assert describe_model(model, (1, 16, 16), 3) == "timm:test_resnet"
    save_model(tmp_path / "m.safetensors", model, in_shape=[1, 16, 16], num_classes=3)
    again = load_model(tmp_path / "m.safetensors")
    assert again.state_dict()["conv1.0.weight"].shape[1] == 1
    # built with another architecture than its name (other depths): not described, rather than wrongly
    other = timm.create_model("test_resnet", num_classes=3, layers=(2, 1, 1, 1))
    assert describe_model(other, (3, 16, 16), 3) is None


@pytest.mark.ecosystem
def test_torchvision_model_trained_through_the_api_reloads(tmp_path, capsys):
    tv = need("torchvision")
    model = tv.models.shufflenet_v2_x0_5(num_classes=3)
    _round_trip(model, _images(tmp_path), tmp_path, capsys, "tv:shufflenet_v2_x0_5")


@pytest.mark.ecosystem
def test_torchvision_builder_is_found_by_class_and_tensors():
    tv = need("torchvision")
    assert describe_model(tv.models.resnet34(num_classes=5), (3, 32, 32), 5) == "tv:resnet34"  # not resnet18
    assert describe_model(tv.models.squeezenet1_1(num_classes=5), (3, 32, 32), 5) == "tv:squeezenet1_1"
    custom = tv.models.resnet.ResNet(tv.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=5)
    assert describe_model(custom, (3, 32, 32), 5) is None  # no builder makes it; never py:torchvision...


@pytest.mark.ecosystem
def test_transformers_image_model_trained_through_the_api_reloads_offline(tmp_path, capsys, monkeypatch):
    tf = need("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = tf.ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, num_labels=3)
    model = tf.AutoModelForImageClassification.from_config(config)
    _round_trip(model, _images(tmp_path), tmp_path, capsys, "hf:vit,task=image-classification")
    recorded = read_model_meta(tmp_path / "run" / "model.safetensors")["hf_config"]
    assert recorded["model_type"] == "vit" and recorded["hidden_size"] == 16


@pytest.mark.ecosystem
def test_transformers_token_model_from_an_hf_spec(tmp_path, capsys):
    need("transformers")
    data = _tokens(tmp_path)
    model = build_model(f"hf:bert,{BERT}", (8,), 3, seed=0)
    assert model(torch.tensor([[1.0, 5, 6, 7, 8, 9, 10, 11]])).shape == (1, 3)  # float token ids become int64
    _round_trip(model, data, tmp_path, capsys, f"hf:bert,{BERT}")


@pytest.mark.ecosystem
def test_hf_specs_build_from_a_config_file_and_a_local_directory(tmp_path):
    tf = need("transformers")
    model = build_model(f"hf:bert,{BERT}", (8,), 3, seed=0)
    (tmp_path / "cfg.json").write_text(model.config.to_json_string())
    from_json = build_model(f"hf:{tmp_path / 'cfg.json'}", (8,), 4)
    assert from_json.config.hidden_size == 16 and from_json.config.num_labels == 4
    model.save_pretrained(tmp_path / "bert")
    from_dir = build_model(f"hf:{tmp_path / 'bert'}", (8,), 3)
    assert torch.equal(from_dir.state_dict()["bert.embeddings.word_embeddings.weight"],
                       model.state_dict()["bert.embeddings.word_embeddings.weight"])  # its weights were read
    assert isinstance(from_dir, tf.BertForSequenceClassification)


@pytest.mark.ecosystem
@pytest.mark.parametrize("spec, match", [
    ("hf:bert-base-uncased", "never downloads"),
    ("hf:someone/their-model", "no local directory"),
    ("hf:bert,trust_remote_code=true", "option 'trust_remote_code' is refused"),
    ("hf:bert,task=translation", "task 'translation'"),
    ("tv:resnet18,weights=DEFAULT", "option 'weights' is refused"),
    ("timm:resnet18,pretrained=true", "option 'pretrained' is refused"),
    ("timm:resnet18,checkpoint_path=/tmp/x.pth", "option 'checkpoint_path' is refused"),
])
def test_adapter_specs_never_fetch_weights_or_code(spec, match):
    need({"hf": "transformers", "tv": "torchvision", "timm": "timm"}[spec.partition(":")[0]])
    with pytest.raises(ValueError, match=match):
        build_model(spec, (3, 16, 16) if not spec.startswith("hf") else (8,), 3)
