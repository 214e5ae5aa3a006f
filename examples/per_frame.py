"""Per-position distillation is not text-only: frame classification, as in the paper's speech experiment.

Synthetic "acoustic" data: each utterance is (L, F) float frames with a label per frame (its state, which depends
on the neighbouring frames, plus noise); utterances have different lengths, padded with label -100 (not scored).
A bidirectional GRU teacher is trained on the labels; a small causal 1-D convolution student is then trained
twice from the same initialisation: on the labels alone, and distilled from the teacher (``kd``, T = 2, 0.5 soft
weight), each term averaged over the valid frames of the whole batch. Frame accuracy on held-out utterances:

    python3 examples/per_frame.py            # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from kdistill import TrainConfig, fit

FEATURES, STATES = 12, 10


def frames(n: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, length, F) frames and (n, length) states; -100 after each utterance's own length."""
    g = torch.Generator().manual_seed(seed)
    proto = torch.randn(STATES, FEATURES, generator=torch.Generator().manual_seed(0))
    # states follow a sticky random walk (as HMM states do); frames are the state's prototype plus noise
    step = torch.randint(-1, 2, (n, length), generator=g) * (torch.rand(n, length, generator=g) < 0.3)
    y = (torch.randint(0, STATES, (n, 1), generator=g) + step.cumsum(1)) % STATES
    x = proto[y] + 1.6 * torch.randn(n, length, FEATURES, generator=g)
    lens = torch.randint(length // 2, length + 1, (n,), generator=g)
    pad = torch.arange(length)[None] >= lens[:, None]
    x[pad] = 0.0
    y = y.masked_fill(pad, -100)
    return x, y


class GRUTagger(nn.Module):
    """Bidirectional GRU over the frames -> per-frame state logits (B, L, C)."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.rnn = nn.GRU(FEATURES, hidden, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * hidden, STATES)

    def forward(self, x):
        return self.out(self.rnn(x)[0])


class ConvTagger(nn.Module):
    """Two 1-D convolutions over time (9 frames of context) -> per-frame state logits."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(FEATURES, width, 5, padding=2), nn.ReLU(),
                                  nn.Conv1d(width, width, 5, padding=2), nn.ReLU())
        self.out = nn.Linear(width, STATES)

    def forward(self, x):
        return self.out(self.conv(x.transpose(1, 2)).transpose(1, 2))


def run(n_train: int = 256, length: int = 40, epochs: int = 12, seed: int = 0) -> dict[str, float]:
    """Teacher, student on labels, distilled student: their held-out frame accuracy."""
    train, test = frames(n_train, length, seed + 1), frames(256, length, seed + 2)
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=3e-3, optimizer="adam", seed=seed)
    torch.manual_seed(seed)
    teacher = fit(GRUTagger(), train, cfg, method="ce", test=test, progress=False)
    torch.manual_seed(seed + 10)
    init = ConvTagger().state_dict()
    out = {"teacher": teacher.test["accuracy"]}
    for name, method, t in (("student (labels)", "ce", None),
                            ("student (distilled)", {"name": "kd", "temperature": 2.0, "alpha": 0.5}, teacher.model)):
        student = ConvTagger()
        student.load_state_dict(init)
        out[name] = fit(student, train, cfg, teacher=t, method=method, test=test, progress=False).test["accuracy"]
    out["valid_frames"] = int((test[1] != -100).sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=1)
    args = ap.parse_args()
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        r = run(seed=seed)
        print(f"seed {seed}: frame accuracy on {r['valid_frames']} held-out frames: teacher {r['teacher']:.3f}, "
              f"student on labels {r['student (labels)']:.3f}, distilled student {r['student (distilled)']:.3f}")
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
