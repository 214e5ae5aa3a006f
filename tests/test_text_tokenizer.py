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
