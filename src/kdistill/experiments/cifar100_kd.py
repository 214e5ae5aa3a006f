"""CIFAR-100: the mdistiller / DKD table (Zhao et al., CVPR 2022) — KD, DKD, FitNets and AT students of
CIFAR-100 teachers, next to the student alone.

mdistiller trains every student 240 epochs (batch 64, SGD lr 0.05 x0.1 at epochs 150/180/210, momentum
0.9, weight decay 5e-4, crop + flip) from a pre-trained teacher: KD at T = 4 with soft weight 0.9, DKD with
alpha 1, T = 4, a 20-epoch warm-up and beta 8 (2 for resnet56 -> resnet20, 6 for wrn:40,2 -> wrn:16,2),
FitNets' hint (weight 100) on the middle stage, AT (beta 1000, p = 2) on every stage. Its published top-1
for resnet32x4 -> resnet8x4: KD 73.33, DKD 76.32 (kept in the results as reference numbers, not measured).
Here the teachers are trained in the run with the same recipe; the table is the last-epoch test accuracy,
mean ± std over seeds. Shared scaffolding: :mod:`._cifar_kd`.
"""

from __future__ import annotations

from typing import Any

from kdistill.experiments import _cifar_kd as kd

NAME = "cifar100-kd"
DESCRIPTION = (
    "CIFAR-100: the mdistiller/DKD table (resnet32x4->resnet8x4 and more) with CE, KD, DKD, FitNets, AT; "
    "published KD/DKD numbers alongside (paper: 240 epochs, for a GPU; quick: a pipeline check)"
)

RECIPE = kd.Recipe(
    name=NAME,
    dataset="cifar100",
    title="CIFAR-100",
    num_classes=100,
    archive="cifar-100-binary.tar.gz",
    plot="cifar100_kd.png",
    intro=(
        "mdistiller's CIFAR-100 table (DKD, Zhao et al. 2022): students trained alone (CE) and with KD, DKD,\n"
        "FitNets and AT from the same teacher, at the same budget, optimiser and augmentation (crop 4 + flip)."
    ),
    published={
        "source": "mdistiller README, DKD main benchmark results on CIFAR-100 (github.com/megvii-research/mdistiller)",
        "top1": {
            "resnet56->resnet20": {"kd": 70.66, "dkd": 71.97},
            "wrn:40,2->wrn:16,2": {"kd": 74.92, "dkd": 76.23},
            "resnet32x4->resnet8x4": {"kd": 73.33, "dkd": 76.32},
        },
    },
)

PROFILES: dict[str, dict[str, Any]] = {
    # A pipeline check: any archive in the official layout, even a hand-made one a few hundred images long
    # (strict: false skips the per-class counts); one small pair, 1 student epoch, one seed. Seconds to a
    # couple of minutes on 2 cores.
    "quick": {
        **kd.COMMON,
        "strict": False,
        "pairs": [{"teacher": "resnet20", "student": "resnet8"}],
        "val_size": 500,
        "train_size": 2000,
        "test_size": 1000,
        "teacher_epochs": 2,
        "student_epochs": 1,
        "seeds": 1,
        "schedule": "cosine",
        "threads": None,
    },
    # mdistiller's protocol (for a GPU): 240 epochs for teachers and students, batch 64, SGD 0.05 x0.1 after
    # epochs 150, 180 and 210 (`step_decay_at`), weight decay 5e-4, 3 seeds;
    # 5,000 training images held out as a validation split (mdistiller trains on all 50,000).
    "paper": kd.paper_profile(),
}

run = kd.experiment(RECIPE)
