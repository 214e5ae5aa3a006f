"""Decoupled KD, FitNets hints and attention transfer against direct float64 formulas written here."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdistill.losses import attention_map, attention_transfer_loss, dkd_loss, hint_loss


def _log_softmax_rows(z):
    """Row-wise log softmax of a float64 list-of-rows, with plain math (max-shifted)."""
    out = []
    for row in z:
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        out.append([v - lse for v in row])
    return out


def reference_dkd(s, t, y, alpha, beta, T):
    """DKD written out per sample: binary KL of (p_t, 1 - p_t) plus KL over the non-target softmax."""
    s, t = (s.double() / T).tolist(), (t.double() / T).tolist()
    tckd = nckd = 0.0
    for si, ti, yi in zip(s, t, y.tolist()):
        ls, lt = _log_softmax_rows([si])[0], _log_softmax_rows([ti])[0]
        rest = [c for c in range(len(si)) if c != yi]
        # log(1 - p_t) as the log of the summed non-target probabilities (raises where they underflow)
        s_rest = math.log(sum(math.exp(ls[c]) for c in rest))
        t_rest = math.log(sum(math.exp(lt[c]) for c in rest))
        tckd += math.exp(lt[yi]) * (lt[yi] - ls[yi]) + math.exp(t_rest) * (t_rest - s_rest)
        q = _log_softmax_rows([[si[c] for c in rest]])[0]
        p = _log_softmax_rows([[ti[c] for c in rest]])[0]
        nckd += sum(math.exp(pc) * (pc - qc) for pc, qc in zip(p, q))
    b = len(s)
    return T * T * (alpha * tckd + beta * nckd) / b


def mdistiller_dkd(ls, lt, target, alpha, beta, temperature):
    """mdistiller's dkd_loss (DKD.py) transcribed: probabilities, cat_mask and the 1000-offset trick."""
    gt = torch.zeros_like(ls).scatter_(1, target[:, None], 1).bool()
    other = ~gt

    def cat_mask(p):
        return torch.cat([(p * gt).sum(1, keepdim=True), (p * other).sum(1, keepdim=True)], dim=1)

    ps, pt = cat_mask(F.softmax(ls / temperature, 1)), cat_mask(F.softmax(lt / temperature, 1))
    tckd = F.kl_div(torch.log(ps), pt, reduction="sum") * temperature**2 / target.shape[0]
    pt2 = F.softmax(lt / temperature - 1000.0 * gt, dim=1)
    ls2 = F.log_softmax(ls / temperature - 1000.0 * gt, dim=1)
    nckd = F.kl_div(ls2, pt2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def _logits(b, c, scale, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(b, c, generator=g) * scale, torch.randn(b, c, generator=g) * scale
    return s, t, torch.randint(0, c, (b,), generator=g)


@pytest.mark.parametrize("T", [0.5, 1.0, 4.0, 20.0])
@pytest.mark.parametrize("alpha, beta", [(1.0, 8.0), (0.0, 1.0), (2.5, 0.0)])
def test_dkd_matches_direct_formula(T, alpha, beta):
    s, t, y = _logits(12, 7, 3.0, int(T * 10) + int(beta))
    got = dkd_loss(s, t, y, alpha=alpha, beta=beta, temperature=T)
    want = reference_dkd(s, t, y, alpha, beta, T)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_matches_mdistiller_for_moderate_logits(T):
    s, t, y = _logits(32, 100, 2.0, 3)
    got = dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=T)
    want = mdistiller_dkd(s.double(), t.double(), y, 1.0, 8.0, T)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    # their float32 version too
    assert got.item() == pytest.approx(mdistiller_dkd(s, t, y, 1.0, 8.0, T).item(), rel=1e-4)


def test_dkd_decomposes_classical_kd():
    # Zhao et al., eq. (5): KL(p_t || p_s) = TCKD + (1 - p_t^teacher) * NCKD, sample by sample.
    s, t, y = _logits(1, 6, 2.0, 9)
    T = 2.0
    tckd = dkd_loss(s, t, y, alpha=1.0, beta=0.0, temperature=T).double()
    nckd = dkd_loss(s, t, y, alpha=0.0, beta=1.0, temperature=T).double()
    p_t = F.softmax(t.double() / T, 1)[0, y[0]]
    log_q, log_p = F.log_softmax(s.double() / T, 1), F.log_softmax(t.double() / T, 1)
    kd = T * T * F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    assert kd.item() == pytest.approx((tckd + (1 - p_t) * nckd).item(), rel=1e-5)


@pytest.mark.parametrize("T", [1.0, 4.0, 100.0, 1000.0])
def test_dkd_huge_logits_finite_and_correct(T):
    s, t, y = _logits(16, 10, 1e4, int(T))
    got = dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=T)
    assert torch.isfinite(got) and got.item() >= 0
    # the student equal to the teacher gives zero, even with huge logits
    assert dkd_loss(t, t.clone(), y, alpha=1.0, beta=8.0, temperature=T).item() == pytest.approx(0.0, abs=1e-6)
    try:
        want = reference_dkd(s, t, y, 1.0, 8.0, T)
    except ValueError:  # log(0) in the direct formula: only finiteness is checkable
        return
    assert got.item() == pytest.approx(want, rel=1e-4)


def test_dkd_huge_logits_gradient_finite_and_only_to_student():
    s, t, y = _logits(8, 10, 1e4, 1)
    s.requires_grad_(True)
    t.requires_grad_(True)
    dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=1.0).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_dkd_gradcheck():
    s, t, y = _logits(3, 5, 2.0, 5)
    s = s.double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: dkd_loss(z, t.double(), y, alpha=1.3, beta=2.0, temperature=2.0), (s,), eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": -1.0, "beta": 1.0, "temperature": 1.0}, "alpha"),
        ({"alpha": float("nan"), "beta": 1.0, "temperature": 1.0}, "alpha"),
        ({"alpha": 1.0, "beta": float("inf"), "temperature": 1.0}, "beta"),
        ({"alpha": 1.0, "beta": -0.5, "temperature": 1.0}, "beta"),
        ({"alpha": 1.0, "beta": 1.0, "temperature": 0.0}, "temperature"),
    ],
)
def test_dkd_rejects_bad_weights(kwargs, match):
    s, t, y = _logits(4, 5, 1.0, 0)
    with pytest.raises(ValueError, match=match):
        dkd_loss(s, t, y, **kwargs)


def test_dkd_rejects_bad_shapes():
    s, t, y = _logits(4, 5, 1.0, 0)
    kw = {"alpha": 1.0, "beta": 1.0, "temperature": 1.0}
    with pytest.raises(ValueError, match="same shape"):
        dkd_loss(s, t[:, :4], y, **kw)
    with pytest.raises(ValueError, match="labels"):
        dkd_loss(s, t, y[:3], **kw)
    with pytest.raises(ValueError, match="labels"):
        dkd_loss(s, t, y.float(), **kw)
    with pytest.raises(ValueError, match="2 classes"):
        dkd_loss(s[:, :1], t[:, :1], torch.zeros(4, dtype=torch.long), **kw)


# --------------------------------------------------------------------------- hints


def test_hint_loss_is_mse_and_detaches_teacher():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 8, 3, 3, generator=g, requires_grad=True)
    t = torch.randn(4, 8, 3, 3, generator=g, requires_grad=True)
    loss = hint_loss(s, t)
    assert torch.allclose(loss, F.mse_loss(s, t))
    loss.backward()
    assert s.grad is not None and t.grad is None
    with pytest.raises(ValueError, match="same shape"):
        hint_loss(s, t[:, :4])


# --------------------------------------------------------------------------- attention transfer


def reference_at(fs, ft, p):
    """Per sample and position: q = a / ||a||_2 with a = mean_c |f|^p, then the mean of (q_s - q_t)^2."""
    fs, ft = fs.double(), ft.double()
    total, count = 0.0, 0
    for a_s, a_t in zip(fs, ft):
        ms = a_s.abs().pow(p).mean(0).flatten()
        mt = a_t.abs().pow(p).mean(0).flatten()
        qs, qt = ms / ms.square().sum().sqrt(), mt / mt.square().sum().sqrt()
        total += float((qs - qt).square().sum())
        count += qs.numel()
    return total / count


@pytest.mark.parametrize("p", [1, 2, 3])
def test_attention_transfer_matches_direct_formula_same_size(p):
    g = torch.Generator().manual_seed(p)
    fs, ft = torch.randn(5, 4, 6, 6, generator=g), torch.randn(5, 16, 6, 6, generator=g)
    assert attention_transfer_loss(fs, ft, p).item() == pytest.approx(reference_at(fs, ft, p), rel=1e-5)


def test_attention_map_rows_are_unit_and_match_mdistiller_for_p2():
    f = torch.randn(3, 5, 4, 7)
    q = attention_map(f)
    assert q.shape == (3, 28)
    assert torch.allclose(q.norm(dim=1), torch.ones(3))
    assert torch.allclose(q, F.normalize(f.pow(2).mean(1).reshape(3, -1)))  # mdistiller's _at


def test_attention_transfer_resizes_the_student_to_the_teacher():
    g = torch.Generator().manual_seed(0)
    ft = torch.randn(4, 8, 4, 4, generator=g)
    big = torch.randn(4, 3, 8, 8, generator=g)  # pooled 2x2 -> 4x4
    got = attention_transfer_loss(big, ft)
    pooled = big.view(4, 3, 4, 2, 4, 2).mean(dim=(3, 5))
    assert got.item() == pytest.approx(reference_at(pooled, ft, 2), rel=1e-5)
    # mdistiller / RepDistiller pool the larger map down: the same here when the student is larger
    at = lambda f: F.normalize(f.pow(2).mean(1).reshape(f.size(0), -1))  # noqa: E731
    assert got.item() == pytest.approx((at(F.adaptive_avg_pool2d(big, (4, 4))) - at(ft)).pow(2).mean().item(), rel=1e-5)
    small = torch.randn(4, 3, 2, 2, generator=g)  # block-upsampled 2x2 -> 4x4
    up = small.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert attention_transfer_loss(small, ft).item() == pytest.approx(reference_at(up, ft, 2), rel=1e-5)
    odd = torch.randn(4, 3, 7, 5, generator=g)
    assert attention_transfer_loss(odd, ft).item() == pytest.approx(
        reference_at(F.adaptive_avg_pool2d(odd, (4, 4)), ft, 2), rel=1e-5
    )


def test_attention_transfer_gradients_and_errors():
    fs = torch.randn(2, 3, 4, 4, requires_grad=True)
    ft = torch.randn(2, 5, 4, 4, requires_grad=True)
    attention_transfer_loss(fs, ft).backward()
    assert torch.isfinite(fs.grad).all() and ft.grad is None
    assert attention_transfer_loss(ft, ft.clone()).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="batch size"):
        attention_transfer_loss(fs[:1], ft)
    with pytest.raises(ValueError, match="student_feature"):
        attention_transfer_loss(fs[0], ft)
    with pytest.raises(ValueError, match="p: "):
        attention_map(ft, p=0)


def test_dkd_warmup_longer_than_the_run_warns_before_training(digits):
    import warnings

    from kdistill import TrainConfig, fit
    from kdistill.methods import build_method
    from kdistill.methods.base import ScheduleWarning
    from kdistill.models import build_model

    teacher = build_model("mlp:16", digits.input_shape, 10, seed=1)
    train = digits.train.subset(torch.arange(64))
    cfg = TrainConfig(epochs=4, batch_size=64)
    with pytest.warns(ScheduleWarning, match=r"method\.warmup: dkd ramps its loss in over 20 epochs but the run "
                                             r"trains 4 .*at most 20%, 10% on average\); set --set method\.warmup=1"):
        fit(build_model("mlp:8", digits.input_shape, 10, seed=2), train, cfg, teacher=teacher, method="dkd",
            progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScheduleWarning)  # a warm-up shorter than the run, or none: silent
        for warmup in (1.0, 0.0):
            assert build_method("dkd", warmup=warmup).check_schedule(4) == []
        assert build_method("kd").check_schedule(1) == []
    with pytest.warns(ScheduleWarning, match="trains 20 "):  # as long as the run: full weight only at its end
        assert len(build_method("dkd").check_schedule(20)) == 1
    assert build_method("dkd").check_schedule(21) == []


def test_a_warning_on_the_command_line_is_one_line(tmp_path):
    """The CLI shows a method's warning as `kdistill: warning: ...`, one line, without Python's source path
    (a subprocess: pytest records warnings instead of printing them)."""
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kdistill.cli", *args, "--no-progress"], capture_output=True,
                              text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})

    teacher = tmp_path / "t"
    assert run("train", "--data", "digits", "--model", "mlp:16", "--epochs", "1", "--out", str(teacher)).returncode == 0
    done = run("distill", "--data", "digits", "--teacher", str(teacher / "model.safetensors"), "--student", "mlp:8",
               "--method", "dkd", "--epochs", "2", "--out", str(tmp_path / "s"))
    assert done.returncode == 0, done.stderr
    err = [line for line in done.stderr.splitlines() if "method.warmup" in line]
    assert len(err) == 1 and err[0].startswith("kdistill: warning: method.warmup: dkd ramps its loss in over 20")
    assert "warnings.warn" not in done.stderr and ".py:" not in done.stderr
