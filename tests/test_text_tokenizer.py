"""A run trained on text: data saves its tokenizer beside the model and records it; evaluate reuses it."""

import json

import pytest
import torch

from ecosystem import need
from kdistill.cli.app import main
from kdistill.data import load
from kdistill.data.text import evaluate_options, load_text, recorded_tokenizer
from kdistill.engine import TrainConfig, fit
from kdistill.io import read_model_meta
from kdistill.models import build_model


def _texts(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("the lord is my shepherd; i shall not want. he maketh me to lie down in green pastures.\n" * 60)
    b = tmp_path / "b.txt"  # other text: a BPE trained on it would have other merges, so other ids
    b.write_text("zebras quickly jumped over lazy foxes while quiet owls hummed by the moonlit quay.\n" * 60)
    return a, b


@pytest.mark.ecosystem
def test_bpe_run_saves_its_tokenizer_and_evaluate_reuses_it(tmp_path, capsys):
    tokenizers = need("tokenizers")
    a, b = _texts(tmp_path)
    bundle = load(f"text:{a}", window=64, tokenizer="bpe", vocab_size=300)
    model = build_model("lm:16,1,heads=2", bundle.input_shape, bundle.train.num_classes, seed=0)
    fit(model, bundle.train, TrainConfig(epochs=1, batch_size=16), test=bundle.test, out_dir=tmp_path / "run",
        progress=False)
    run = tmp_path / "run"
    saved = json.loads((run / "tokenizer.json").read_text())
    record = recorded_tokenizer(run / "model.safetensors")
    assert record["kind"] == "bpe" and json.loads(record["json"]) == saved  # the model file records it too
    assert read_model_meta(run / "model.safetensors")["preprocessing"]["input_dtype"] == "int64"

    # other text, tokenised with the run's own BPE: the ids are those of the saved tokenizer, not of a new one
    options = evaluate_options(f"text:{b}", {"window": 64}, run / "model.safetensors")
    reused, tok = load_text(b, **options)
    want = tokenizers.Tokenizer.from_file(str(run / "tokenizer.json")).encode(b.read_text()[:200]).ids
    assert tok.encode(b.read_text()[:200]).ids == want
    retrained, _ = load_text(b, window=64, tokenizer="bpe", vocab_size=300)
    assert not torch.equal(reused.test.x[:4], retrained.test.x[:4])  # what reuse prevents

    # the CLI: evaluate on the run's own data (config.yaml absent: --data) and on the other text
    for data in (a, b):
        assert main(["evaluate", "--model", str(run / "model.safetensors"), "--data", f"text:{data}"]) == 0
        metrics = json.loads(capsys.readouterr().out)
        assert metrics["count"] > 0 and metrics["perplexity"] > 1


def test_bytes_run_writes_a_note_and_records_bytes(tmp_path):
    a, _ = _texts(tmp_path)
    bundle = load(f"text:{a}", window=16)
    model = build_model("lm:16,1,heads=2", bundle.input_shape, bundle.train.num_classes, seed=0)
    fit(model, bundle.train, TrainConfig(epochs=1, batch_size=16), out_dir=tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "tokenizer.txt").read_text().startswith("bytes:")
    assert recorded_tokenizer(tmp_path / "run" / "model.safetensors") == {"kind": "bytes", "vocab_size": 256}
    assert evaluate_options(f"text:{a}", {"window": 16}, tmp_path / "run" / "model.safetensors") == {"window": 16}


def _greedy(model, ids, window, n):
    """The test's own greedy loop: the reference for predict --generate."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out[-window:]]))[0, -1].argmax()))
    return out[len(ids):]


@pytest.mark.ecosystem
def test_predict_text_tokenises_with_the_runs_bpe_and_continues_greedily(tmp_path, capsys):
    tokenizers = need("tokenizers")
    a, _ = _texts(tmp_path)
    bundle = load(f"text:{a}", window=32, tokenizer="bpe", vocab_size=300)
    model = build_model("lm:16,1,heads=2", bundle.input_shape, bundle.train.num_classes, seed=0)
    fit(model, bundle.train, TrainConfig(epochs=2, batch_size=16), out_dir=tmp_path / "run", progress=False)
    weights = str(tmp_path / "run" / "model.safetensors")
    prompt = "the quick brown"
    assert main(["predict", "--model", weights, "--text", prompt, "--top", "2", "--generate", "6", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "run" / "tokenizer.json"))
    ids = tok.encode(prompt).ids
    model.eval()
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([ids]))[0, -1], -1)
    assert row["tokens"] == len(ids) and [t["id"] for t in row["top"]] == p.topk(2).indices.tolist()
    assert row["top"][0]["p"] == pytest.approx(float(p.max()), rel=1e-5)
    assert row["continuation"] == tok.decode(_greedy(model, ids, 32, 6))


def test_predict_text_on_a_bytes_model_and_refusals(tmp_path, capsys):
    a, _ = _texts(tmp_path)
    bundle = load(f"text:{a}", window=16)
    model = build_model("lm:16,1,heads=2", bundle.input_shape, bundle.train.num_classes, seed=0)
    fit(model, bundle.train, TrainConfig(epochs=1, batch_size=16), out_dir=tmp_path / "run", progress=False)
    weights = str(tmp_path / "run" / "model.safetensors")
    prompt = "A long prompt, longer than the sixteen-byte window"
    assert main(["predict", "--model", weights, "--text", prompt, "--generate", "4", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    model.eval()
    ids = list(prompt.encode())
    assert row["tokens"] == len(ids)
    assert bytes(_greedy(model, ids, 16, 4)).decode("utf-8", "replace") == row["continuation"]
    assert main(["predict", "--model", weights, "--text", "x"]) == 0  # the plain table
    assert "'x' (1 tokens)" in capsys.readouterr().out
    assert main(["predict", "--model", weights, "--text", ""]) == 2
    assert "--text: an empty prompt" in capsys.readouterr().err
    bundle_64 = load(f"text:{a}", window=64)
    lm64 = build_model("lm:16,1,heads=2", bundle_64.input_shape, 256, seed=0)
    fit(lm64, bundle_64.train, TrainConfig(epochs=1, batch_size=16), out_dir=tmp_path / "run64", progress=False)
    assert main(["predict", "--model", str(tmp_path / "run64" / "model.safetensors"), "--data", f"text:{a}",
                 "--save-logits", str(tmp_path / "l.npy")]) == 2
    assert "one label per position" in capsys.readouterr().err and not (tmp_path / "l.npy").exists()
    image = tmp_path / "img"
    fit(build_model("mlp:8", (4,), 3), (torch.randn(32, 4), torch.randint(0, 3, (32,))), TrainConfig(epochs=1),
        out_dir=image, progress=False)
    assert main(["predict", "--model", str(image / "model.safetensors"), "--text", "hi"]) == 2
    assert "records no tokenizer" in capsys.readouterr().err


@pytest.mark.ecosystem
def test_distill_on_text_reuses_the_teachers_bpe_and_refuses_another(tmp_path, capsys):
    need("tokenizers")
    a, b = _texts(tmp_path)
    common = ["--epochs", "1", "--batch-size", "16", "--no-progress"]
    assert main(["train", "--data", f"text:{a}", "--set", "data.tokenizer=bpe", "--set", "data.vocab_size=300",
                 "--set", "data.window=32", "--model", "lm:16,1,heads=2", "--out", str(tmp_path / "t"), *common]) == 0
    teacher = str(tmp_path / "t" / "model.safetensors")
    # no tokenizer named: the student trains on the teacher's ids, and records the same BPE
    assert main(["distill", "--data", f"text:{b}", "--set", "data.window=32", "--teacher", teacher,
                 "--student", "lm:8,1,heads=2", "--out", str(tmp_path / "s"), *common]) == 0
    assert recorded_tokenizer(tmp_path / "s" / "model.safetensors")["sha256"] == recorded_tokenizer(teacher)["sha256"]
    capsys.readouterr()
    # a new BPE trained on other text: other ids for the same text, refused before any work
    assert main(["distill", "--data", f"text:{b}", "--set", "data.tokenizer=bpe", "--set", "data.vocab_size=300",
                 "--set", "data.window=32", "--teacher", teacher, "--student", "lm:8,1,heads=2",
                 "--out", str(tmp_path / "s2"), *common]) == 2
    err = capsys.readouterr().err
    assert "the teacher would read other token ids" in err and "data.tokenizer_file" in err
    assert not (tmp_path / "s2" / "model.safetensors").exists()
