"""Small data sets that need no download: scikit-learn digits and ``make_classification``."""

from __future__ import annotations

import torch

from kdistill.data.dataset import DataBundle, TensorData
from kdistill.data.splits import split_validation


def _to_bundle(x, y, classes, test_size: int | float, seed: int, name: str) -> DataBundle:
    full = TensorData(x=torch.as_tensor(x, dtype=torch.float32), y=torch.as_tensor(y), classes=classes, name=name)
    train, test = split_validation(full, test_size, seed=seed + 1000)
    return DataBundle(
        train=TensorData(train.x, train.y, classes, torch.arange(len(train)), f"{name}-train"),
        test=TensorData(test.x, test.y, classes, torch.arange(len(test)), f"{name}-test"),
    )


def load_digits(test_size: int | float = 0.2, seed: int = 0) -> DataBundle:
    """scikit-learn's 1,797 8x8 digits as 1x8x8 images in [0, 1]; the test split is stratified and seeded."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    return _to_bundle(x, d.target, tuple(str(i) for i in range(10)), test_size, seed, "digits")


def load_synthetic(
    samples: int = 10000,
    features: int = 20,
    classes: int = 10,
    class_sep: float = 1.0,
    informative: float = 0.8,
    test_size: int | float = 0.2,
    seed: int = 0,
) -> DataBundle:
    """``make_classification`` with ``informative`` as the fraction of informative features."""
    from sklearn.datasets import make_classification

    if not 0.0 < informative <= 1.0:
        raise ValueError(f"informative: a fraction in (0, 1], got {informative}")
    n_inf = max(1, round(informative * features))
    # make_classification needs classes * clusters <= 2 ** informative.
    if classes > 2**n_inf:
        raise ValueError(f"informative: {n_inf} informative features cannot separate {classes} classes")
    x, y = make_classification(
        n_samples=samples,
        n_features=features,
        n_informative=n_inf,
        n_redundant=0,
        n_repeated=0,
        n_classes=classes,
        n_clusters_per_class=1,
        class_sep=class_sep,
        random_state=seed,
    )
    names = tuple(str(i) for i in range(classes))
    return _to_bundle(x, y, names, test_size, seed, f"synthetic-sep{class_sep}-inf{informative}")
