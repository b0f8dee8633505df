"""Datasets by name. Each builder turns a config into train/test splits plus the facts a model needs.

Only ``synthetic`` and ``digits`` work fully offline; the torchvision datasets read ``data_dir`` and
download only when the matrix says ``download: true``.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset
from torchvision import datasets as tvd
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from bench.base.registry import Registry, did_you_mean

DATASETS: Registry[Callable[[Any], "DatasetSplits"]] = Registry("dataset")

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
MNIST_STATS = ((0.1307,) * 3, (0.3081,) * 3)
FASHION_MNIST_STATS = ((0.2860,) * 3, (0.3530,) * 3)
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SYNTHETIC_SEED = 0
DIGITS_SIZE = 1797  # sklearn.datasets.load_digits
DIGITS_TEST_FRACTION = 0.2  # build_digits's split; train_test_split rounds the test share up


@dataclass(frozen=True)
class DatasetSplits:
    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]  # C, H, W of one sample
    accuracy_meaningful: bool  # False for synthetic (random labels)
    # Per-channel (mean, std) the inputs were normalized with: image = input * std + mean in [0, 1].
    normalization: tuple[tuple[float, ...], tuple[float, ...]]
    flip_safe: bool  # whether a mirrored sample keeps its label (not for digits: a mirrored 2 is no 2)


# Synthetic inputs are N(0, 1) noise, no image; read as normalized images of N(0.5, 0.25²) pixels,
# 95% of them fall in [0, 1], so an augmentation sees roughly what it expects.
SYNTHETIC_STATS = ((0.5,) * 3, (0.25,) * 3)


def build_dataset(cfg: Any) -> DatasetSplits:
    """Build the splits of the dataset named ``cfg.dataset``; names resolve only through DATASETS."""
    if cfg.dataset not in DATASETS:
        raise ValueError(
            f"unknown dataset {cfg.dataset!r}{did_you_mean(cfg.dataset, DATASETS.names())}; "
            f"known: {', '.join(DATASETS.names())}"
        )
    return DATASETS.get(cfg.dataset)(cfg)


def augment_train(splits: DatasetSplits, transforms: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> DatasetSplits:
    """The splits with ``transforms`` applied, in order, to every training image on access (in the
    DataLoader workers); the test split is untouched.

    The transforms see the image as torchvision expects it, float in [0, 1] (un-normalized), and
    their output is normalized again with the dataset's statistics, so the per-sample pipeline is
    raw → augment → normalize whatever the dataset's own preprocessing stored.
    """
    if not transforms:
        return splits
    mean, std = (torch.tensor(v) for v in splits.normalization)
    to_image = v2.Normalize((-mean / std).tolist(), (1 / std).tolist())  # (x - (-m/s)) / (1/s) = x s + m
    pipeline = v2.Compose([to_image, _clamp_unit, *transforms, v2.Normalize(*splits.normalization)])
    return dataclasses.replace(splits, train=_Augmented(splits.train, pipeline))


def _clamp_unit(image: torch.Tensor) -> torch.Tensor:
    """Float rounding of the un-normalization can step just outside [0, 1], which torchvision's
    colour operations assume."""
    return image.clamp(0.0, 1.0)


def _shape(ds: Dataset) -> tuple[int, int, int]:
    c, h, w = ds[0][0].shape
    return int(c), int(h), int(w)


class _Augmented(Dataset):
    """Applies a random transform to the input of a dataset on every access."""

    def __init__(self, base: Dataset, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base[i]
        return self.transform(x), y


@DATASETS.register("synthetic", description="random normal inputs and random labels; for speed/memory runs")
def build_synthetic(cfg: Any) -> DatasetSplits:
    """Seeded random data, identical on every build, so throughput/memory runs need no files.

    Labels are random, so accuracy on it says nothing (accuracy_meaningful=False).
    """
    size = cfg.image_size or 32
    k = cfg.num_classes or 10
    n_train, n_test = cfg.num_samples, max(cfg.num_samples // 4, 1)
    g = torch.Generator().manual_seed(SYNTHETIC_SEED)
    x = torch.randn(n_train + n_test, 3, size, size, generator=g)
    y = torch.randint(0, k, (n_train + n_test,), generator=g)
    train = TensorDataset(x[:n_train], y[:n_train])
    test = TensorDataset(x[n_train:], y[n_train:])
    return DatasetSplits(train, test, k, (3, size, size), accuracy_meaningful=False, normalization=SYNTHETIC_STATS,
                         flip_safe=True)


@DATASETS.register("digits", description="scikit-learn 8x8 digits upscaled to 3x32x32; real, tiny, offline")
def build_digits(cfg: Any) -> DatasetSplits:
    """A real 10-class task that ships with scikit-learn, so accuracy can be compared without a download.

    Preprocessing is batched over all 1797 images at once. Not flip-safe: mirrored digits change meaning.
    """
    # lazy: scikit-learn costs ~1 s and only the digits dataset needs it
    from sklearn.datasets import load_digits

    # lazy: scikit-learn costs ~1 s and only the digits dataset needs it
    from sklearn.model_selection import train_test_split

    size = cfg.image_size or 32
    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # N,1,8,8 in [0,1]
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    train_idx, test_idx = train_test_split(
        torch.arange(len(y)).numpy(), test_size=DIGITS_TEST_FRACTION, stratify=y.numpy(), random_state=0
    )
    x_train, x_test = x[torch.as_tensor(train_idx)], x[torch.as_tensor(test_idx)]
    mean, std = x_train.mean(), x_train.std()
    train = TensorDataset((x_train - mean) / std, y[torch.as_tensor(train_idx)])
    test = TensorDataset((x_test - mean) / std, y[torch.as_tensor(test_idx)])
    stats = ((mean.item(),) * 3, (std.item(),) * 3)
    return DatasetSplits(train, test, 10, (3, size, size), accuracy_meaningful=True, normalization=stats,
                         flip_safe=False)


def _transforms(cfg: Any, stats: tuple, native: int, grey: bool) -> v2.Compose:
    """The pipeline of small torchvision datasets: always 3 channels at ``native`` size, then
    resized when ``cfg.image_size`` asks for another size (augmentation: ``augment_train``)."""
    head: list[Any] = [v2.ToImage()]
    if grey:  # 1x28x28 -> 3x32x32, so every model sees the same input as on CIFAR
        head += [v2.Grayscale(num_output_channels=3), v2.Pad(2)]
    tail: list[Any] = []
    if cfg.image_size and cfg.image_size != native:
        tail.append(v2.Resize((cfg.image_size, cfg.image_size)))
    tail += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(*stats)]
    return v2.Compose(head + tail)


def _load(cls: type, name: str, cfg: Any, train: bool, transform: Callable) -> Dataset:
    """Instantiate a torchvision dataset; a missing dataset becomes a FileNotFoundError that says what to do."""
    try:
        return cls(root=cfg.data_dir, train=train, download=cfg.download, transform=transform)
    except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
        if cfg.download:
            raise
        raise FileNotFoundError(
            f"dataset {name!r} not found under data_dir={cfg.data_dir!r} ({e}); "
            f"set `download: true` in the matrix to fetch it"
        ) from e


def _torchvision(cls: type, name: str, cfg: Any, stats: tuple, grey: bool, flip: bool) -> DatasetSplits:
    transform = _transforms(cfg, stats, native=32, grey=grey)
    train = _load(cls, name, cfg, True, transform)
    test = _load(cls, name, cfg, False, transform)
    return DatasetSplits(train, test, len(train.classes), _shape(test), accuracy_meaningful=True,
                         normalization=stats, flip_safe=flip)


@DATASETS.register("cifar10", description="CIFAR-10, 3x32x32, 10 classes (torchvision)")
def build_cifar10(cfg: Any) -> DatasetSplits:
    """CIFAR-10 from ``data_dir``: the standard small-image benchmark for training tricks."""
    return _torchvision(tvd.CIFAR10, "cifar10", cfg, CIFAR10_STATS, grey=False, flip=True)


@DATASETS.register("cifar100", description="CIFAR-100, 3x32x32, 100 classes (torchvision)")
def build_cifar100(cfg: Any) -> DatasetSplits:
    """CIFAR-100 from ``data_dir``: same images as CIFAR-10 in size, harder with 100 fine labels."""
    return _torchvision(tvd.CIFAR100, "cifar100", cfg, CIFAR100_STATS, grey=False, flip=True)


@DATASETS.register("mnist", description="MNIST digits, padded to 3x32x32 (torchvision)")
def build_mnist(cfg: Any) -> DatasetSplits:
    """MNIST from ``data_dir``, made 3x32x32. Not flip-safe: mirrored digits change meaning."""
    return _torchvision(tvd.MNIST, "mnist", cfg, MNIST_STATS, grey=True, flip=False)


@DATASETS.register("fashion_mnist", description="Fashion-MNIST, padded to 3x32x32 (torchvision)")
def build_fashion_mnist(cfg: Any) -> DatasetSplits:
    """Fashion-MNIST from ``data_dir``, made 3x32x32; harder than MNIST at the same cost."""
    return _torchvision(tvd.FashionMNIST, "fashion_mnist", cfg, FASHION_MNIST_STATS, grey=True, flip=True)


@DATASETS.register("imagefolder", description="any data_dir/{train,val}/<class>/<image> tree (ImageNet layout)")
def build_imagefolder(cfg: Any) -> DatasetSplits:
    """Your own images in the ImageNet folder layout; ``download`` does not apply."""
    size = cfg.image_size or 224
    roots = {split: Path(cfg.data_dir) / split for split in ("train", "val")}
    for folder in roots.values():
        if not folder.is_dir():
            raise FileNotFoundError(f"imagefolder: missing folder {str(folder)!r} (expected <data_dir>/train and /val)")
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(*IMAGENET_STATS)]
    transform = v2.Compose([v2.ToImage(), v2.Resize(size), v2.CenterCrop(size), *tail])
    train = tvd.ImageFolder(str(roots["train"]), transform=transform)
    test = tvd.ImageFolder(str(roots["val"]), transform=transform)
    if test.classes != train.classes:  # labels are folder indices, so both splits need the same folders
        raise ValueError(f"imagefolder: train classes {train.classes} differ from val classes {test.classes}")
    return DatasetSplits(train, test, len(train.classes), _shape(test), accuracy_meaningful=True,
                         normalization=IMAGENET_STATS, flip_safe=True)


# ---- facts without loading: what validation needs to know before any run starts ----

@dataclass(frozen=True)
class DatasetFacts:
    """What a dataset's splits would be, known without building them (cheap, no download)."""

    train_size: int
    num_classes: int
    input_shape: tuple[int, int, int]  # C, H, W of one sample, as the model receives it


def _fixed(train_size: int, num_classes: int, native: int) -> Callable[[Any], DatasetFacts]:
    return lambda cfg: DatasetFacts(train_size, num_classes, (3, cfg.image_size or native, cfg.image_size or native))


def _synthetic_facts(cfg: Any) -> DatasetFacts:
    size = cfg.image_size or 32
    return DatasetFacts(cfg.num_samples, cfg.num_classes or 10, (3, size, size))


def _imagefolder_facts(cfg: Any) -> DatasetFacts:
    """Counts the class folders and image files of data_dir/train (as ImageFolder would find them)."""

    for split in ("train", "val"):
        if not (Path(cfg.data_dir) / split).is_dir():
            raise FileNotFoundError(f"imagefolder needs data_dir with train/ and val/ class folders; "
                                    f"{str(Path(cfg.data_dir) / split)!r} is not a folder")
    classes = [entry for entry in os.scandir(Path(cfg.data_dir) / "train") if entry.is_dir()]
    if not classes:
        raise FileNotFoundError(f"imagefolder: {str(Path(cfg.data_dir) / 'train')!r} has no class folders")
    images = sum(name.lower().endswith(IMG_EXTENSIONS)
                 for folder in classes for _, _, names in os.walk(folder.path, followlinks=True) for name in names)
    size = cfg.image_size or 224
    return DatasetFacts(images, len(classes), (3, size, size))


def _torchvision_facts(folder: Callable[[Path], Path], train_size: int, num_classes: int
                       ) -> Callable[[Any], DatasetFacts]:
    """Fixed facts, once the files are known to be there (or will be downloaded)."""
    fixed = _fixed(train_size, num_classes, 32)

    def facts(cfg: Any) -> DatasetFacts:
        expected = folder(Path(cfg.data_dir))
        if not cfg.download and not expected.is_dir():
            raise FileNotFoundError(f"dataset {cfg.dataset} not found: no folder {str(expected)!r}; "
                                    "set data_dir, or download: true to fetch it")
        return fixed(cfg)

    return facts


FACTS: dict[str, Callable[[Any], DatasetFacts]] = {
    "synthetic": _synthetic_facts,
    "digits": _fixed(DIGITS_SIZE - math.ceil(DIGITS_TEST_FRACTION * DIGITS_SIZE), 10, 32),
    "cifar10": _torchvision_facts(lambda root: root / tvd.CIFAR10.base_folder, 50_000, 10),
    "cifar100": _torchvision_facts(lambda root: root / tvd.CIFAR100.base_folder, 50_000, 100),
    # 28x28 padded to 32x32; torchvision keeps them in <root>/<class name>/raw
    "mnist": _torchvision_facts(lambda root: root / "MNIST" / "raw", 60_000, 10),
    "fashion_mnist": _torchvision_facts(lambda root: root / "FashionMNIST" / "raw", 60_000, 10),
    "imagefolder": _imagefolder_facts,
}


def dataset_facts(cfg: Any) -> DatasetFacts:
    """Training-set size, classes and input shape of ``cfg.dataset`` without loading it.

    Raises FileNotFoundError when the data it needs to count is not there (imagefolder).
    """
    return FACTS[cfg.dataset](cfg)
