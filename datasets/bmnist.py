"""Binarized MNIST for the VAE, reproducing the standard protocol (Larochelle & Murray, 2011).

Built from the MNIST files the other loaders use, the same way as Larochelle's files: the official
training set split 50,000 / 10,000 (first / last images), the official 10,000 test images, each pixel
drawn once from Bernoulli(intensity / 255) with a fixed seed. The same protocol, not the identical
bits.
The draw is cached under ``<root>/BMNIST/``. With ``dynamic=True`` the training split is instead
redrawn on every pass (dynamic binarization), which regularises the model.
"""

from pathlib import Path

import numpy as np
import torch

from datasets.loader import TensorLoader
from datasets.raw import load_mnist_arrays

BINARIZATION_SEED = 1234
N_TRAIN = 50_000


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
           seed=BINARIZATION_SEED):
    """(train, val, test) loaders of binary images [B, 1, 28, 28], 50k/10k/10k.

    Validation and test are always the fixed draw; training is the fixed draw, or redrawn from the
    grey levels every epoch when ``dynamic``.
    """
    train_bits, test_bits = _static_bits(root, download, seed)

    def as_images(bits):
        return torch.from_numpy(bits.astype(np.float32)).reshape(-1, 1, 28, 28)

    if dynamic:
        train_x, _, _, _ = load_mnist_arrays(root, download)
        grey = torch.from_numpy(train_x[:N_TRAIN]).float().div_(255.0)[:, None]
        train = TensorLoader(grey, batch_size=batch_size, shuffle=True, generator=generator,
                             transform=dynamic_binarize)
    else:
        train = TensorLoader(as_images(train_bits[:N_TRAIN]), batch_size=batch_size, shuffle=True,
                             generator=generator)
    return (
        train,
        TensorLoader(as_images(train_bits[N_TRAIN:]), batch_size=batch_size),
        TensorLoader(as_images(test_bits), batch_size=batch_size),
    )
