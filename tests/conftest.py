"""Shared fixtures: small, valid IDX files in torchvision's MNIST layout, and the repository paths."""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import datasets.raw  # noqa: E402

N_FAKE_TRAIN, N_FAKE_TEST = 120, 30
# For the tests of bf16 training matmuls, which oneDNN runs on CPUs with AMX units only.
needs_amx = pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(),
                               reason="oneDNN's bf16 matmuls need a CPU with AMX units")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test: results don't depend on the machine's core count, and tests run
    beside a training without fighting it for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_idx(path, array):
    """Write a uint8 array as an IDX file: magic 0x0000 0x08 ndim, big-endian dims, then the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(header + array.tobytes())
    return path


def fake_mnist_arrays(seed=0):
    """Random images and labels with MNIST's shapes but few of them; every image holds a 0 and a 255,
    so value ranges have known extremes."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", N_FAKE_TRAIN), ("t10k", N_FAKE_TEST)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0], images[:, -1, -1] = 0, 255
        arrays[f"{prefix}-images-idx3-ubyte"] = images
        arrays[f"{prefix}-labels-idx1-ubyte"] = rng.integers(0, 10, size=n, dtype=np.uint8)
    return arrays


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """A small fake MNIST under ``tmp_path/MNIST/raw`` whose MD5s are the ones ``datasets.raw``
    expects for the duration of the test, so verification runs for real on these files.

    Returns a namespace: ``root``, ``arrays`` (name -> uint8 array) and ``md5`` (name -> digest).
    """
    arrays = fake_mnist_arrays()
    folder = datasets.raw.raw_dir(tmp_path)
    md5 = {name: datasets.raw.md5sum(write_idx(folder / name, arrays[name])) for name in datasets.raw.MD5}
    monkeypatch.setattr(datasets.raw, "MD5", md5)
    return SimpleNamespace(root=tmp_path, arrays=arrays, md5=md5)


@pytest.fixture
def fake_mnist_root(fake_mnist):
    """Just the data root of ``fake_mnist``, for tests that only need valid data to exist."""
    return fake_mnist.root
