"""MNIST for the flow (0..255 floats, flattened) and for the GAN ([-1, 1] images).

``mnist`` keeps the course template's signature and splits: the first 40,000 training images for
training, the next 10,000 for validation, the official 10,000 for test.
"""

import torch

from datasets.loader import TensorLoader
from datasets.raw import load_mnist_arrays

N_TRAIN, N_VAL = 40_000, 10_000


def random_translate(images, generator=None):
    """The template's augmentation, batched: edge-pad by 1, translate, centre-crop back to 28x28.

    The template's ``RandomAffine(translate=(0.05, 0.05))`` on the padded 30x30 image shifts by
    round(U(-1.5, 1.5)), i.e. -1, 0 or +1 pixel each way with equal probability; the border it
    uncovers is padding and is cropped away. ``images`` is [B, 784] or [B, 1, 28, 28].
    """
    shape = images.shape
    square = images.reshape(-1, 28, 28)
    padded = torch.nn.functional.pad(square[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    shift = torch.randint(-1, 2, (len(square), 2), generator=generator)
    offsets = torch.arange(28)
    rows = (1 + shift[:, 0, None] + offsets)[:, :, None]
    cols = (1 + shift[:, 1, None] + offsets)[:, None, :]
    return padded[torch.arange(len(square))[:, None, None], rows, cols].reshape(shape)


def mnist(root="./data/", batch_size=128, download=True, *, generator=None, augment=True):
    """(trainloader, valloader, testloader): 40k/10k/10k, values 0..255 as float, shape [B, 784].

    Each yields ``(images, labels)``; training batches are shuffled and randomly translated.
    """
    train_x, train_y, test_x, test_y = load_mnist_arrays(root, download)
    images = torch.from_numpy(train_x.reshape(-1, 784).astype("float32"))
    labels = torch.from_numpy(train_y.astype("int64"))
    test_images = torch.from_numpy(test_x.reshape(-1, 784).astype("float32"))
    splits = (slice(0, N_TRAIN), slice(N_TRAIN, N_TRAIN + N_VAL))
    train, val = ((images[s], labels[s]) for s in splits)
    return (
        TensorLoader(*train, batch_size=batch_size, shuffle=True, generator=generator,
                     transform=random_translate if augment else None),
        TensorLoader(*val, batch_size=batch_size),
        TensorLoader(test_images, torch.from_numpy(test_y.astype("int64")), batch_size=batch_size),
    )


def mnist_gan(root="./data/", batch_size=64, download=True, *, generator=None):
    """All 60,000 training images as [B, 1, 28, 28] in [-1, 1] (the generator's tanh range),
    shuffled, with labels: what the GAN template's ``Normalize((0.5,), (0.5,))`` gives."""
    train_x, train_y, _, _ = load_mnist_arrays(root, download)
    images = torch.from_numpy(train_x).float().div_(127.5).sub_(1.0)[:, None]
    return TensorLoader(images, torch.from_numpy(train_y.astype("int64")), batch_size=batch_size,
                        shuffle=True, generator=generator)
