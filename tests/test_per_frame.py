"""Per-position distillation beyond text: float frames (N, L, F), a state label per frame with -100 padding, a
GRU teacher and a convolutional student (examples/per_frame.py is the runnable version)."""

import torch
from torch import nn

from kdistill import TrainConfig, fit

F_, C, L = 6, 4, 12


def _frames(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    proto = 2.0 * torch.randn(C, F_, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, C, (n, L // 3), generator=g).repeat_interleave(3, dim=1)  # states last 3 frames
    x = proto[y] + torch.randn(n, L, F_, generator=g)
    pad = torch.arange(L)[None] >= torch.randint(L // 2, L + 1, (n,), generator=g)[:, None]
    x[pad] = 0.0
    return x, y.masked_fill(pad, -100)


class GRUTagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.out = nn.GRU(F_, 16, batch_first=True, bidirectional=True), nn.Linear(32, C)

    def forward(self, x):
        return self.out(self.rnn(x)[0])


class ConvTagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.out = nn.Conv1d(F_, 8, 3, padding=1), nn.Linear(8, C)

    def forward(self, x):
        return self.out(torch.relu(self.conv(x.transpose(1, 2))).transpose(1, 2))


def test_frames_distilled_from_a_gru_into_a_conv_student():
    train, test = _frames(64, 1), _frames(48, 2)
    cfg = TrainConfig(epochs=6, batch_size=16, lr=1e-2, optimizer="adam")
    teacher = fit(GRUTagger(), train, cfg, method="ce", test=test, progress=False)
    assert teacher.test["count"] == int((test[1] != -100).sum()) < test[1].numel()  # padding not scored
    assert teacher.test["accuracy"] > 0.8
    torch.manual_seed(0)
    r = fit(ConvTagger(), train, cfg, teacher=teacher.model, method={"name": "kd", "temperature": 2.0, "alpha": 0.5},
            test=test, progress=False)
    assert r.test["accuracy"] > 0.7 and "perplexity" in r.test
    assert r.history[-1]["loss_kd"] < r.history[0]["loss_kd"]
