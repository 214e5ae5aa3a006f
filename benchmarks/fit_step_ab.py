"""Time one-epoch fit runs of a W1-shaped student (cached teacher): run it once per checkout to A/B two engines.

    PYTHONPATH=OLD_CHECKOUT/src python benchmarks/fit_step_ab.py old
    PYTHONPATH=NEW_CHECKOUT/src python benchmarks/fit_step_ab.py new     # alternate a few times, compare best times
"""
import time, torch, sys
from kdistill import TrainConfig, fit, models
from kdistill.data import TensorData
from kdistill.teachers.base import CachedTeacher
torch.set_num_threads(2)
n = 12800
x = torch.rand(n, 1, 28, 28); y = torch.randint(0, 10, (n,))
d = TensorData(x, y, tuple("0123456789"))
t = CachedTeacher(d.index, torch.randn(n, 10))
ts = []
for r in range(6):
    m = models.build_model("mlp:800,800", (1, 28, 28), 10, seed=0)
    t0 = time.perf_counter(); fit(m, d, TrainConfig(epochs=1, batch_size=128), teacher=t, method={"name": "kd", "temperature": 20.0}, progress=False); ts.append(time.perf_counter() - t0)
print(sys.argv[1], [round(v, 3) for v in ts], "steps/s", round(100 / min(ts), 1))
