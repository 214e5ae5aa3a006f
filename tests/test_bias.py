import pytest
import torch

import kdistill.models.bias as bias
from kdistill.engine.evaluate import predict_logits
from kdistill.models import build_model


def _teacher_like(n=600, classes=10, seed=0):
    """Logits of a fairly confident classifier and the labels it is mostly right about."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g) * 1.5
    logits[torch.arange(n), labels] += 4.5
    return logits, labels


def test_error_steps_agree_with_brute_force():
    logits, labels = _teacher_like()
    logits[:, 3] -= 4.0
    breaks, errors = bias.error_steps(logits, labels, [3])
    assert len(errors) == len(breaks) + 1
    probes = torch.linspace(-12, 12, 241)
    brute = bias.errors_at_offsets(logits, labels, [3], probes)
    k = torch.searchsorted(breaks.double(), probes.double())  # interval of each probe
    assert torch.equal(errors[k], brute)


def test_offset_chosen_on_labels_undoes_a_depressed_class():
    logits, labels = _teacher_like()
    clean_errors = int((logits.argmax(1) != labels).sum())
    shifted = logits.clone()
    shifted[:, 3] -= 5.0
    choice = bias.choose_offset_on_labels(shifted, labels, [3])
    assert choice.errors_at_zero > clean_errors + 30  # the depressed class is mostly lost
    assert choice.errors <= clean_errors  # the chosen offset recovers at least the clean accuracy
    lo, hi = choice.interval
    assert lo < choice.offset < hi and 3.0 < choice.offset < 7.0
    after = int((bias.add_offset(shifted, [3], choice.offset).argmax(1) != labels).sum())
    assert after == choice.errors
    # No offset on a fine grid does better.
    grid = torch.linspace(-10, 10, 2001)
    assert int(bias.errors_at_offsets(shifted, labels, [3], grid).min()) >= choice.errors


def test_label_free_offset_recovers_a_known_shift_without_labels():
    teacher, _ = _teacher_like(seed=1)
    student = teacher * 1.0
    student[:, 3] -= 3.25
    assert bias.label_free_offset(student, teacher, [3]) == pytest.approx(3.25, abs=1e-5)
    # A shared offset on two over-confident classes comes out negative (the paper lowers 7 and 8).
    student78 = teacher.clone()
    student78[:, [7, 8]] += 6.0
    assert bias.label_free_offset(student78, teacher, [7, 8]) == pytest.approx(-6.0, abs=1e-5)


def test_matched_mass_is_reached():
    logits, _ = _teacher_like(seed=2)
    b = bias.match_mass_offset(logits, [3], 0.25)
    assert bias.mass_at_offset(logits, [3], b) == pytest.approx(0.25, abs=1e-6)
    assert bias.mass_at_offset(logits, [3], b + 1) > 0.25 > bias.mass_at_offset(logits, [3], b - 1)


def test_offset_folds_into_the_final_linear_bias_of_a_copy():
    model = build_model("mlp:16,8", (1, 8, 8), 10, seed=0)
    x = torch.rand(32, 1, 8, 8)
    before = predict_logits(model, x)
    adjusted = bias.with_logit_offset(model, [7, 8], -2.5)
    expected = before + bias.offset_vector(10, [7, 8], -2.5)
    assert torch.allclose(predict_logits(adjusted, x), expected, atol=1e-5)
    assert torch.equal(predict_logits(model, x), before)  # the original is untouched


@pytest.mark.parametrize("call, match", [
    (lambda: bias.label_free_offset(torch.zeros(4, 10), torch.zeros(4, 10), []), "classes"),
    (lambda: bias.label_free_offset(torch.zeros(4, 10), torch.zeros(4, 10), [10]), "classes"),
    (lambda: bias.label_free_offset(torch.zeros(4, 10), torch.zeros(5, 10), [3]), "teacher_logits"),
    (lambda: bias.choose_offset_on_labels(torch.zeros(4, 10), torch.tensor([0, 1, -1, 2]), [3]), "labels"),
    (lambda: bias.match_mass_offset(torch.zeros(4, 10), [3], 1.0), "target"),
    (lambda: bias.with_logit_offset(torch.nn.ReLU(), [3], 1.0), "nn.Linear"),
])
def test_bad_input_names_the_field(call, match):
    with pytest.raises(ValueError, match=match):
        call()
