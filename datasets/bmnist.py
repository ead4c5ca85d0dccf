"""Binarized MNIST for the VAE (Larochelle & Murray, 2011).

First choice: the files papers use, Larochelle's ``binarized_mnist_{train,valid,test}.amat`` from the
address the course template downloads them from (50,000 / 10,000 / 10,000 images, one fixed draw),
kept under ``<root>/BMNIST/`` and verified by size and SHA-256 (the values TensorFlow Datasets
publishes). They hold bits only, so training on them is never dynamically binarized.

Where they cannot be had, a reproduction of their protocol, built from the MNIST files the other
loaders use: the official training set split 50,000 / 10,000 (first / last images), the official
10,000 test images, each pixel drawn once from Bernoulli(intensity / 255) with a fixed seed. The same
protocol, not the identical bits, so only likelihoods on the original files compare with papers'.
The draw is cached under ``<root>/BMNIST/``. With ``dynamic=True`` the training split is instead
redrawn on every pass (dynamic binarization), which regularises the model.
"""

import os
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import torch

from datasets.loader import TensorLoader
from datasets.raw import ChecksumError, DataError, hexdigest, load_mnist_arrays

BINARIZATION_SEED = 1234
N_TRAIN = 50_000
ORIGINAL_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
# split: (file, size in bytes, SHA-256). Each image is a line of 784 digits "0"/"1" and separators.
ORIGINAL_FILES = {
    "train": ("binarized_mnist_train.amat", 78_400_000,
              "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d"),
    "valid": ("binarized_mnist_valid.amat", 15_680_000,
              "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2"),
    "test": ("binarized_mnist_test.amat", 15_680_000,
             "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c"),
}
DOWNLOAD_TIMEOUT_S = 20


class DownloadFailed(DataError):
    """An original file could not be fetched, or what came was not the published file."""


class Splits(tuple):
    """The (train, val, test) loaders, and ``source``: which binarized MNIST they hold."""

    def __new__(cls, loaders, source):
        splits = super().__new__(cls, loaders)
        splits.source = source
        return splits


def verify_original(path, split):
    """Raise a ChecksumError naming ``path`` unless it has the published size and SHA-256."""
    name, size, sha256 = ORIGINAL_FILES[split]
    actual_size = Path(path).stat().st_size
    if actual_size != size:
        raise ChecksumError(f"{path} is not the original {name}: {actual_size} bytes, expected {size}")
    actual = hexdigest(path, "sha256")
    if actual != sha256:
        raise ChecksumError(f"{path} is corrupted: SHA-256 {actual}, expected {sha256}")


def read_amat(path):
    """The bits [N, 784] of an .amat file: every other byte is a digit, the others separators."""
    digits = np.fromfile(path, dtype=np.uint8)[::2]
    return (digits - ord("0")).reshape(-1, 784)


def _download(url, path, split):
    """Fetch ``url`` into a temporary file beside ``path``; move it into place only once verified."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
        verify_original(tmp, split)
        os.replace(tmp, path)
    except (OSError, ChecksumError) as error:  # urllib's errors are OSErrors
        raise DownloadFailed(f"{url}: {error}") from error
    finally:
        tmp.unlink(missing_ok=True)


def fetch_original(root, base_url=ORIGINAL_URL, download=True):
    """{split: bits [N, 784]} from the original files under ``<root>/BMNIST/``, each downloaded from
    ``base_url`` when missing. A download that fails or fails verification raises DownloadFailed,
    naming the file, and installs nothing; a file already in place that fails verification raises a
    ChecksumError naming it (delete it, as for MNIST)."""
    folder = Path(root) / "BMNIST"
    bits = {}
    for split, (name, _, _) in ORIGINAL_FILES.items():
        path = folder / name
        if path.exists():
            try:
                verify_original(path, split)
            except ChecksumError as error:
                raise ChecksumError(f"{error}. Delete it and run again to fetch a fresh copy.") from None
        elif download:
            folder.mkdir(parents=True, exist_ok=True)
            _download(base_url + name, path, split)
        else:
            raise DataError(f"{path} is missing (download=False)")
        bits[split] = read_amat(path)
    return bits


def binarize(intensities, seed):
    """Bits drawn from Bernoulli(intensity / 255) with a numpy generator seeded by ``seed``."""
    rng = np.random.default_rng(seed)
    return (rng.random(intensities.shape, dtype=np.float32) * 255 < intensities).astype(np.uint8)


def _static_bits(root, download, seed):
    """(train_bits [60000, 784], test_bits [10000, 784]), drawn once and cached compressed."""
    cache = Path(root) / "BMNIST" / f"bmnist_seed{seed}.npz"
    if cache.exists():
        with np.load(cache) as f:
            return np.unpackbits(f["train"], axis=1), np.unpackbits(f["test"], axis=1)
    train_x, _, test_x, _ = load_mnist_arrays(root, download)
    train = binarize(train_x.reshape(-1, 784), seed)
    test = binarize(test_x.reshape(-1, 784), seed + 1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, train=np.packbits(train, axis=1), test=np.packbits(test, axis=1))
    tmp.replace(cache)
    return train, test


def dynamic_binarize(intensities, generator=None):
    """Fresh bits for a batch of intensities in [0, 1]."""
    return torch.bernoulli(intensities, generator=generator)


def bmnist(root="./data/", batch_size=128, download=True, *, dynamic=False, generator=None,
           seed=BINARIZATION_SEED, base_url=None, log=print):
    """(train, val, test) loaders of binary images [B, 1, 28, 28], 50k/10k/10k, as ``Splits``, whose
    ``source`` records which data they hold.

    The original files when they are in ``<root>/BMNIST/`` or can be downloaded from ``base_url``
    (default ORIGINAL_URL);
    otherwise the reproduction, said in one line through ``log``. On the reproduction, validation and
    test are always the fixed draw; training is the fixed draw, or redrawn from the grey levels every
    epoch when ``dynamic``.
    """
    def as_images(bits):
        return torch.from_numpy(bits.astype(np.float32)).reshape(-1, 1, 28, 28)

    try:
        original = fetch_original(root, base_url or ORIGINAL_URL, download)
    except ChecksumError:
        raise  # a bad file already in place: the user deletes it, as for MNIST
    except DataError as error:  # not downloadable here, or download=False and not in place
        original, reason = None, str(error)
    if original is not None:
        log("binarized MNIST: Larochelle & Murray's original files" +
            (" (one fixed draw: no dynamic binarization)" if dynamic else ""))
        source = {"binarized_mnist": "original", "dynamic_binarization": False}
        return Splits((TensorLoader(as_images(original["train"]), batch_size=batch_size, shuffle=True,
                                    generator=generator),
                       TensorLoader(as_images(original["valid"]), batch_size=batch_size),
                       TensorLoader(as_images(original["test"]), batch_size=batch_size)), source)
    log(f"binarized MNIST: the original files are out of reach ({reason.splitlines()[0]}), so this run "
        f"uses the reproduction (seed {seed}), whose likelihoods do not compare exactly with papers'")
    source = {"binarized_mnist": "reproduction", "binarization_seed": seed, "dynamic_binarization": dynamic}
    train_bits, test_bits = _static_bits(root, download, seed)
    if dynamic:
        train_x, _, _, _ = load_mnist_arrays(root, download)
        grey = torch.from_numpy(train_x[:N_TRAIN]).float().div_(255.0)[:, None]
        train = TensorLoader(grey, batch_size=batch_size, shuffle=True, generator=generator,
                             transform=dynamic_binarize)
    else:
        train = TensorLoader(as_images(train_bits[:N_TRAIN]), batch_size=batch_size, shuffle=True,
                             generator=generator)
    return Splits((
        train,
        TensorLoader(as_images(train_bits[N_TRAIN:]), batch_size=batch_size),
        TensorLoader(as_images(test_bits), batch_size=batch_size),
    ), source)
