"""`kdistill run lm-ensemble` end to end on a small synthetic English text (no corpus, no network)."""

import json
import random

import pytest
import torch

from kdistill.experiments import run_experiment
from kdistill.models import build_model

TINY = ["chars=0", "window=16", "model=lm:16,1,heads=2", "members=2", "epochs=1", "batch_size=32",
        "temperatures=[2.0]", "alphas=[1.0]", "distill_means=[geometric]", "deploy_budget_s=0.1"]


def _english(path, sentences=160):
    r = random.Random(0)
    subjects = ["the shepherd", "a king", "the people", "his servant", "the prophet", "my brother"]
    verbs = ["went up to", "spoke unto", "looked upon", "came out of", "dwelt in", "built"]
    places = ["the city", "the mountain", "the house of bread", "the river", "the temple", "the field"]
    lines = [f"And {r.choice(subjects)} {r.choice(verbs)} {r.choice(places)}." for _ in range(sentences)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_recipe_writes_the_speech_table_with_the_gain_kept(tmp_path):
    text = _english(tmp_path / "english.txt")
    out = tmp_path / "run"
    results = run_experiment("lm-ensemble", "quick", out, TINY, data_path=str(text), progress=False)
    saved = json.loads((out / "results.json").read_text())
    summary = saved["summary"]
    assert set(saved["models"]) == {"baseline", "ensemble-arithmetic", "ensemble-geometric", "distilled"}
    for role in saved["models"].values():
        acc, ppl = (v["mean"] if isinstance(v, dict) else v for v in (role["test_accuracy"], role["test_perplexity"]))
        assert 0 <= acc <= 1 and ppl > 1
    kept = summary["by_mean"]["geometric"]["accuracy"]
    # the fraction is exactly the ratio of the gains, which come from the models' own numbers
    m = saved["models"]
    base = m["baseline"]["test_accuracy"]["mean"]
    assert kept["ensemble_gain"] == pytest.approx(m["ensemble-geometric"]["test_accuracy"] - base)
    assert kept["distilled_gain"] == pytest.approx(m["distilled"]["test_accuracy"] - base)
    if kept["ensemble_gain"] > 0:
        assert summary["gain_kept_accuracy"] == pytest.approx(kept["distilled_gain"] / kept["ensemble_gain"])
    assert "gain_kept_nll" in summary and summary["chosen"]["mean"] == "geometric"
    assert [r["alpha"] for r in summary["validation"]] == [1.0]
    assert "deployment" in results and (out / "report.html").is_file()
    assert summary["tokens"]["test"] > 0 and "english.txt" in summary["corpus"]
    # the validation split's numbers, which settings are chosen by, are recorded and consistent
    v = summary["validation_models"]
    members = v["members"][0]
    assert len(members) == 2 and all(0 <= m["accuracy"] <= 1 and m["nll"] > 0 for m in members)
    base = sum(m["accuracy"] for m in members) / 2
    gain = v["ensembles"]["geometric"]["accuracy"] - base
    assert v["kept"]["geometric"]["accuracy"]["ensemble_gain"] == pytest.approx(gain)
    assert v["kept"]["geometric"]["accuracy"]["distilled_gain"] == pytest.approx(v["distilled"]["accuracy"] - base)
    assert v["distilled"]["accuracy"] == pytest.approx(summary["validation"][0]["val_accuracy"])
    if gain > 0:
        assert summary["validation_kept"] == pytest.approx((v["distilled"]["accuracy"] - base) / gain)
        assert summary["validation"][0]["val_kept_accuracy"] == pytest.approx(summary["validation_kept"])
    assert "validation_kept_nll" in summary and "kept on validation" in (out / "results.md").read_text()


def test_recipe_refuses_a_one_model_ensemble_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="members: an ensemble needs at least 2"):
        run_experiment("lm-ensemble", "quick", tmp_path / "r", TINY + ["members=1"],
                       data_path=str(_english(tmp_path / "e.txt")), progress=False)


def test_lm_is_causal():
    model = build_model("lm:16,2,heads=2", (12,), 30, seed=0).eval()
    x = torch.randint(0, 30, (2, 12))
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % 30  # change only the tokens from position 7 on
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (2, 12, 30)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])
