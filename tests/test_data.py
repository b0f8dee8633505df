"""Every dataset builds offline: torchvision datasets from tiny files written in their real on-disk format."""
from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset
from torchvision import datasets as tvd

from bench.parts.data import CIFAR10_STATS, DATASETS, DatasetSplits, build_dataset


def cfg(dataset: str, **kw) -> SimpleNamespace:
    base = dict(
        dataset=dataset, data_dir="/nonexistent", download=False, image_size=None,
        num_classes=None, num_samples=16,
    )
    return SimpleNamespace(**{**base, **kw})


def test_all_builders_registered():
    names = {"synthetic", "digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder"}
    assert names <= set(DATASETS.names())
    assert all(e.description for e in DATASETS)


def test_unknown_dataset_suggests_name():
    with pytest.raises(ValueError, match="did you mean 'digits'"):
        build_dataset(cfg("digit"))


# --- synthetic -------------------------------------------------------------------------------------


def test_synthetic_shapes_and_flags():
    s = build_dataset(cfg("synthetic", num_samples=20, num_classes=5, image_size=16))
    assert isinstance(s, DatasetSplits)
    assert (len(s.train), len(s.test)) == (20, 5)
    assert s.input_shape == (3, 16, 16) and s.train[0][0].shape == (3, 16, 16)
    assert s.num_classes == 5 and not s.accuracy_meaningful
    ys = torch.cat([s.train.tensors[1], s.test.tensors[1]])
    assert 0 <= ys.min() and ys.max() < 5


def test_synthetic_defaults_and_tiny():
    s = build_dataset(cfg("synthetic", num_samples=3))
    assert s.num_classes == 10 and s.input_shape == (3, 32, 32)
    assert (len(s.train), len(s.test)) == (3, 1)


def test_synthetic_deterministic_and_independent_of_global_rng():
    torch.manual_seed(1)
    a = build_dataset(cfg("synthetic"))
    torch.manual_seed(2)
    b = build_dataset(cfg("synthetic"))
    for ta, tb in zip(a.train.tensors + a.test.tensors, b.train.tensors + b.test.tensors):
        assert torch.equal(ta, tb)


# --- digits ----------------------------------------------------------------------------------------


def test_digits():
    s = build_dataset(cfg("digits"))
    assert (len(s.train), len(s.test)) == (1437, 360)
    assert s.num_classes == 10 and s.accuracy_meaningful and s.input_shape == (3, 32, 32)
    x, y = s.train.tensors
    assert x.shape == (1437, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
    assert torch.equal(x[:, 0], x[:, 2])  # grey repeated to 3 channels
    assert set(s.test.tensors[1].tolist()) == set(range(10))  # stratified: every class in test
    again = build_dataset(cfg("digits"))
    assert torch.equal(again.test.tensors[1], s.test.tensors[1])  # fixed split


def test_digits_image_size_and_stats():
    s = build_dataset(cfg("digits", image_size=16))
    assert s.input_shape == (3, 16, 16)
    x, y = s.train[0]
    assert x.shape == (3, 16, 16) and y.dtype == torch.int64
    assert isinstance(s.test, TensorDataset)
    assert not s.flip_safe  # a mirrored digit is another symbol
    (mean, *_), (std, *_) = s.normalization
    images = s.train.tensors[0] * std + mean  # the stored statistics undo the normalization
    assert images.min() >= -1e-6 and images.max() <= 1 + 1e-6 and images.max() > 0.99


# --- cifar -----------------------------------------------------------------------------------------


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


@pytest.fixture
def skip_md5(monkeypatch):
    """torchvision verifies the md5 of each real CIFAR file; our tiny stand-ins cannot match it.
    The data files go through ``_check_integrity`` and batches.meta/meta through the module-level
    ``check_integrity(path, md5)`` in ``_load_meta``, so both are patched to mean "file exists"."""
    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tvd.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


def write_cifar10(root: Path, per_batch: int = 4) -> None:
    d = root / "cifar-10-batches-py"
    for i in range(1, 6):
        _pickle(d / f"data_batch_{i}", {"data": _images(per_batch, i), "labels": [(i + j) % 10 for j in range(per_batch)]})
    _pickle(d / "test_batch", {"data": _images(3, 0), "labels": [0, 9, 5]})
    _pickle(d / "batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": per_batch})


def write_cifar100(root: Path) -> None:
    d = root / "cifar-100-python"
    _pickle(d / "train", {"data": _images(6, 1), "fine_labels": [0, 1, 2, 97, 98, 99], "coarse_labels": [0] * 6})
    _pickle(d / "test", {"data": _images(2, 2), "fine_labels": [42, 99], "coarse_labels": [0, 0]})
    _pickle(d / "meta", {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": ["c"] * 20})


def test_cifar10(tmp_path, skip_md5):
    write_cifar10(tmp_path)
    s = build_dataset(cfg("cifar10", data_dir=str(tmp_path)))
    assert (len(s.train), len(s.test)) == (20, 3)
    assert s.num_classes == 10 and s.input_shape == (3, 32, 32) and s.accuracy_meaningful
    x, y = s.test[1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 9
    assert [s.train[i][1] for i in range(len(s.train))] == [(i + j) % 10 for i in range(1, 6) for j in range(4)]
    assert s.flip_safe and s.normalization == CIFAR10_STATS
    big = build_dataset(cfg("cifar10", data_dir=str(tmp_path), image_size=40))
    assert big.input_shape == (3, 40, 40) and big.train[0][0].shape == (3, 40, 40)


def test_cifar100(tmp_path, skip_md5):
    write_cifar100(tmp_path)
    s = build_dataset(cfg("cifar100", data_dir=str(tmp_path)))
    assert (len(s.train), len(s.test)) == (6, 2)
    assert s.num_classes == 100 and s.input_shape == (3, 32, 32)
    assert [s.train[i][1] for i in range(6)] == [0, 1, 2, 97, 98, 99]
    assert s.test[1][1] == 99
    assert s.train[0][0].shape == (3, 32, 32)


# --- mnist / fashion_mnist -------------------------------------------------------------------------


def _idx(path: Path, arr: np.ndarray) -> None:
    """IDX format: magic 0x00 0x00 <type 0x08=uint8> <ndim>, then each dim as big-endian uint32, then data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str) -> None:
    # torchvision 0.29 MNIST only checks that the four raw files exist (no md5), then parses them.
    raw, rng = root / folder / "raw", np.random.default_rng(0)
    for prefix, n in (("train", 5), ("t10k", 3)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_like(tmp_path, name, folder):
    write_mnist(tmp_path, folder)
    s = build_dataset(cfg(name, data_dir=str(tmp_path)))
    assert (len(s.train), len(s.test)) == (5, 3)
    assert s.num_classes == 10 and s.input_shape == (3, 32, 32)
    x, y = s.test[2]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 2
    assert torch.equal(x[0], x[1])  # grey repeated to 3 channels
    assert s.flip_safe == (name == "fashion_mnist")  # mirrored clothes stay clothes, digits do not
    small = build_dataset(cfg(name, data_dir=str(tmp_path), image_size=28))
    assert small.input_shape == (3, 28, 28) and small.train[0][0].shape == (3, 28, 28)


# --- imagefolder -----------------------------------------------------------------------------------


def write_imagefolder(root: Path, classes=("cat", "dog", "eel")) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def test_imagefolder(tmp_path):
    write_imagefolder(tmp_path)
    s = build_dataset(cfg("imagefolder", data_dir=str(tmp_path), image_size=32))
    assert (len(s.train), len(s.test)) == (6, 3)
    assert s.num_classes == 3 and s.input_shape == (3, 32, 32)
    assert s.test[2][1] == 2 and s.test[2][0].shape == (3, 32, 32)
    assert s.train[0][0].shape == (3, 32, 32) and s.flip_safe


def test_imagefolder_missing_val(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="val"):
        build_dataset(cfg("imagefolder", data_dir=str(tmp_path)))


# --- missing data ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist", "fashion_mnist"])
def test_missing_dataset_says_download(tmp_path, name):
    with pytest.raises(FileNotFoundError, match="download") as err:
        build_dataset(cfg(name, data_dir=str(tmp_path)))
    assert name in str(err.value) and str(tmp_path) in str(err.value)
