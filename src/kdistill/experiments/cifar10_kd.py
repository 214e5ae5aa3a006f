"""CIFAR-10: methods beyond Hinton's (DKD, FitNets, AT) next to KD and the student alone, teacher/student
pairs from the CIFAR family, on one budget.

For each pair the teacher is trained once; then, for every seed, one student per method is trained with
the same epochs, optimiser (SGD momentum 0.9, weight decay 5e-4, lr 0.05 at batch 64) and augmentation
(4-pixel crop and flip), distilling from the teacher live on every augmented batch: KD at T = 4 with soft
weight 0.9, DKD with alpha 1, beta 8, T = 4 and its weight ramped over the first 20/240 of the epochs,
FitNets with a hint weight of 100 on the middle stage, AT with beta 1000 and p = 2 on every stage (each
also with the hard-label term). The hyper-parameters are mdistiller's CIFAR-100 ones, not tuned here;
a validation split is carved from the training images and only reported. The table is the last-epoch
test accuracy, mean ± std over seeds. Shared scaffolding: :mod:`._cifar_kd`.
"""

from __future__ import annotations

from typing import Any

from kdistill.experiments import _cifar_kd as kd

NAME = "cifar10-kd"
DESCRIPTION = (
    "CIFAR-10: student alone, KD, DKD, FitNets and AT for resnet20->resnet8 and wrn:16,2->resnet8, "
    "last-epoch test accuracy over seeds (quick: a pipeline check on subsets)"
)

RECIPE = kd.Recipe(
    name=NAME,
    dataset="cifar10",
    title="CIFAR-10",
    num_classes=10,
    archive="cifar-10-binary.tar.gz",
    plot="cifar10_kd.png",
    intro=(
        "Students trained alone (CE) and distilled with KD (Hinton et al.), DKD (Zhao et al.), FitNets (Romero\n"
        "et al.) and AT (Zagoruyko & Komodakis) from the same teacher, at the same budget, optimiser and\n"
        "augmentation (crop 4 + flip), on CIFAR-10; one ResNet pair and one cross-family (WRN -> ResNet) pair."
    ),
)

_PAIRS = [
    {"teacher": "resnet20", "student": "resnet8"},  # ResNet -> ResNet
    {"teacher": "wrn:16,2", "student": "resnet8"},  # WideResNet -> ResNet (cross-family)
]
PROFILES: dict[str, dict[str, Any]] = {
    # A pipeline check, not a result: 2,000 training / 500 validation / 1,000 test images, teachers 4 epochs,
    # students 2, one seed, one thread (two threads on a busy 2-core machine stall each other: 10x slower epochs
    # were seen). About 2-2.5 min on an idle core (estimated from the per-epoch times below; the measured run
    # is in results/cifar10-kd/quick).
    "quick": {
        **kd.COMMON,
        "pairs": _PAIRS,
        "val_size": 500,
        "train_size": 2000,
        "test_size": 1000,
        "teacher_epochs": 4,
        "student_epochs": 2,
        "seeds": 1,
        "schedule": "cosine",
        "threads": 1,
    },
    # All 45,000 training images (5,000 held out), the 10,000 test images; teachers 8 epochs, students 4, 3 seeds.
    # Estimate ~2.0 h on 2 idle cores, from per-epoch times measured on the real data (30-step runs, 2 threads,
    # per 45,000-image epoch): teachers resnet20 67 s, wrn:16,2 123 s; resnet8 alone 28 s, distilled from
    # resnet20 42-46 s, from wrn:16,2 59-64 s (the live teacher forward). Teachers 8 x 190 s = 1,520 s; students
    # 3 seeds x 4 epochs x (28 + 176 + 246) s = 5,400 s (the CE student is shared by both pairs); evaluation
    # ~200 s. On 1 thread about 1.6x longer (~3.2 h). Measured on 2026-12-02 (2 cores, other work at times):
    # teachers resnet20 1,193 s (slowed by OMP_WAIT_POLICY=PASSIVE) and wrn:16,2 1,917 s; students from resnet20
    # 137 s (alone) to 287 s (AT): about 3.5 h in all, so stops are kept (`--resume` continues).
    "full": {
        **kd.COMMON,
        "pairs": _PAIRS,
        "val_size": 5000,
        "train_size": None,
        "test_size": None,
        "teacher_epochs": 8,
        "student_epochs": 4,
        "seeds": 3,
        "schedule": "cosine",
        "threads": None,
    },
    # mdistiller's protocol (for a GPU): 240 epochs, batch 64, SGD 0.05 with step decay, weight decay 5e-4,
    # 3 seeds, its CIFAR-100 pairs with its DKD beta per pair (configs/cifar100/dkd/*.yaml), x0.1 after epochs
    # 150, 180 and 210.
    "paper": kd.paper_profile(),
}

run = kd.experiment(RECIPE)
