"""kdistill.engine.denormal: training flushes subnormal floats on every pool thread, then restores the state."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from kdistill import TrainConfig, fit
from kdistill.data import TensorData
from kdistill.engine.callbacks import Callback
from kdistill.engine.denormal import denormals_flushed, flushed_denormals

SUPPORTED = torch.set_flush_denormal(False)  # False on a CPU without FTZ/DAZ (the default state is off)
needs_ftz = pytest.mark.skipif(not SUPPORTED, reason="this CPU cannot flush subnormal floats")

POOL_PROBE = textwrap.dedent("""
    import json, sys
    import torch
    from kdistill.engine.denormal import denormals_flushed, flushed_denormals

    torch.set_num_threads(2)
    if sys.argv[1] == "on":
        torch.set_flush_denormal(True)  # before the pool exists: its threads inherit the flags
    a = torch.randn(512, 512)
    a @ a  # the OpenMP pool now exists
    x = torch.full((1 << 20,), 1e-39)
    share = lambda: float(((x * 1.0) == 0).float().mean())  # elements flushed, over both threads' halves
    out = {"before": share()}
    with flushed_denormals() as inside:
        out.update(inside=inside, during=share(), probe=denormals_flushed(threads=True))
    out["after"] = share()
    torch.set_flush_denormal(not denormals_flushed())  # the main thread alone, as torch does it
    out["main_only"] = share()
    print(json.dumps(out))
""")


def _pool(start: str) -> dict:
    out = subprocess.run([sys.executable, "-c", POOL_PROBE, start], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_ftz
def test_every_pool_thread_flushes_inside_and_the_off_state_comes_back():
    r = _pool("off")
    assert r["before"] == 0.0 and r["after"] == 0.0
    assert r["inside"] is True and r["probe"] is True
    assert r["during"] == 1.0  # both threads' halves, not just the main thread's
    if torch.get_num_threads() > 1:
        assert 0.0 < r["main_only"] < 1.0  # what torch.set_flush_denormal alone would have done


@needs_ftz
def test_a_state_already_on_is_left_on():
    r = _pool("on")
    assert r["before"] == 1.0 and r["during"] == 1.0 and r["after"] == 1.0


def test_disabled_changes_nothing():
    before = denormals_flushed()
    with flushed_denormals(enabled=False) as inside:
        assert inside == before == denormals_flushed()
    assert denormals_flushed() == before


class _Record(Callback):
    def __init__(self):
        self.seen = []

    def on_epoch_end(self, state, rows):
        self.seen.append(denormals_flushed(threads=True))


@needs_ftz
@pytest.mark.parametrize("flush", [True, False])
def test_fit_trains_with_the_configured_state_and_restores_it(flush):
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.rand(64, 20, generator=g), torch.randint(0, 3, (64,), generator=g), ("a", "b", "c"))
    model = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    rec = _Record()
    fit(model, data, TrainConfig(epochs=2, batch_size=16, checkpoint=False, device="cpu", flush_denormal=flush),
        progress=False, callbacks=[rec])
    assert rec.seen == [flush, flush]
    assert denormals_flushed(threads=True) is False
