import math

import pytest
from scipy.stats import spearmanr

import kdistill.sweeps.grid as sweeps


def _records():
    # Two temperatures, three seeds each: T=4 has the best single run but T=2 the best mean.
    vals = {2.0: [0.90, 0.91, 0.92], 4.0: [0.95, 0.85, 0.86]}
    return [
        {"T": T, "seed": i, "val_accuracy": v, "test_accuracy": 1 - v}
        for T, vs in vals.items()
        for i, v in enumerate(vs)
    ]


def test_grid_is_the_full_product_first_axis_slowest():
    g = sweeps.grid(T=[1, 4], alpha=[0.5, 1.0])
    assert g == [{"T": 1, "alpha": 0.5}, {"T": 1, "alpha": 1.0}, {"T": 4, "alpha": 0.5}, {"T": 4, "alpha": 1.0}]
    assert len(sweeps.grid(a=[1, 2, 3], b=[1, 2], c=[0])) == 6


@pytest.mark.parametrize("axes, match", [({"T": []}, "at least one"), ({"T": "124"}, "list"), ({"T": 3}, "list")])
def test_grid_rejects_bad_axes(axes, match):
    with pytest.raises(ValueError, match=match):
        sweeps.grid(**axes)


def test_seed_list():
    assert sweeps.seed_list(3, 4) == [3, 4, 5, 6]
    with pytest.raises(ValueError, match="seeds"):
        sweeps.seed_list(0, 0)


def test_select_group_aggregate():
    recs = _records()
    assert [r["seed"] for r in sweeps.select(recs, T=4.0)] == [0, 1, 2]
    assert list(sweeps.group(recs, ["T"])) == [(2.0,), (4.0,)]
    rows = sweeps.aggregate(recs, ["T"], ["val_accuracy"])
    assert rows[0]["T"] == 2.0 and rows[0]["n"] == 3
    assert rows[0]["val_accuracy"]["mean"] == pytest.approx(0.91)
    assert rows[0]["val_accuracy"]["std"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="lacks"):
        sweeps.group([{"x": 1}], ["T"])


def test_choose_best_uses_the_mean_over_seeds_and_only_validation():
    recs = _records()
    assert sweeps.choose_best(recs, ["T"], "val_accuracy") == {"T": 2.0}
    lower = [dict(r, val_loss=r["val_accuracy"]) for r in recs]
    assert sweeps.choose_best(lower, ["T"], "val_loss", higher_is_better=False) == {"T": 4.0}
    with pytest.raises(ValueError, match="validation"):
        sweeps.choose_best(recs, ["T"], "test_accuracy")


def test_choose_best_breaks_ties_deterministically():
    recs = [{"T": T, "val_accuracy": 0.5} for T in (10.0, 3.0, 5.0)]
    assert sweeps.choose_best(recs, ["T"], "val_accuracy") == {"T": 10.0}  # first seen
    ordered = sorted(recs, key=lambda r: r["T"])  # a grid declared in order of preference
    assert sweeps.choose_best(ordered, ["T"], "val_accuracy") == {"T": 3.0}
    with pytest.raises(TypeError):
        sweeps.choose_best(recs, ["T"], "val_accuracy", tie_break=lambda s: s["T"])  # one rule, no per-recipe ones
    nan_first = [{"T": 1.0, "val_accuracy": math.nan}, {"T": 2.0, "val_accuracy": 0.1}]
    assert sweeps.choose_best(nan_first, ["T"], "val_accuracy") == {"T": 2.0}


def test_within_noise():
    recs = _records()
    # Best mean is T=2 (0.91 ± 0.01); T=4's mean 0.8867 is 0.023 below: outside one std.
    assert sweeps.within_noise(recs, ["T"], "val_accuracy") == [{"T": 2.0}]
    close = recs + [{"T": 3.0, "seed": 0, "val_accuracy": 0.905}]
    assert {d["T"] for d in sweeps.within_noise(close, ["T"], "val_accuracy")} == {2.0, 3.0}
    with pytest.raises(ValueError, match="validation"):
        sweeps.within_noise(recs, ["T"], "test_accuracy")


def test_mean_curve_aligns_common_steps():
    a = [(0, 0.1), (10, 0.5), (20, 0.7)]
    b = [(0, 0.3), (10, 0.7), (15, 0.9), (20, 0.9)]
    steps, mean, std = sweeps.mean_curve([a, b])
    assert steps == [0, 10, 20]
    assert mean == pytest.approx([0.2, 0.6, 0.8])
    assert std[0] == pytest.approx(math.sqrt(0.02))


def test_curve_helpers():
    steps, vals = [0, 10, 20, 30], [0.1, 0.5, 0.96, 0.97]
    assert sweeps.first_step_reaching(steps, vals, 0.95) == 20
    assert sweeps.first_step_reaching(steps, vals, 0.99) is None
    assert sweeps.curve_mean_until(steps, vals, 10) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        sweeps.curve_mean_until(steps, vals, -1)
    with pytest.raises(ValueError, match="length"):
        sweeps.first_step_reaching([0], [1, 2], 0.5)


@pytest.mark.parametrize(
    "x, y",
    [
        ([10, 30, 100, 300], [3, 2.5, 8, 20]),
        ([1, 2, 3, 4, 5], [2, 2, 1, 5, 5]),
        ([0, 0.1, 0.5, 1], [0.9, 0.8, 0.8, 0.2]),
    ],
)
def test_rank_correlation_matches_scipy(x, y):
    assert sweeps.rank_correlation(x, y) == pytest.approx(spearmanr(x, y).statistic)


def test_rank_correlation_constant_is_nan():
    assert math.isnan(sweeps.rank_correlation([1, 2, 3], [2, 2, 2]))


def test_label_is_stable():
    assert sweeps.label({"T": 4.0, "alpha": 0.5}) == "T=4.0,alpha=0.5"


def test_intra_op_threads_restores_the_count():
    import torch

    before = torch.get_num_threads()
    with sweeps.intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with sweeps.intra_op_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"), sweeps.intra_op_threads(0):
        pass
