"""A small digit classifier: the feature extractor and judge behind FID, score and class coverage.

An ImageNet Inception network would need downloaded weights and knows nothing of digits, so we
train our own convnet on the MNIST training split: above 99% test accuracy in a few CPU minutes.
It is trained once and cached as ``<root>/classifier/digit_classifier.pt`` together with a
fingerprint of its training configuration; a changed configuration or CLASSIFIER_VERSION retrains it.
"""

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common import atomic_write
from datasets.loader import TensorLoader
from datasets.mnist import random_translate
from datasets.raw import load_mnist_arrays

# Bump when the code that trains the classifier changes meaning: cached classifiers then retrain.
CLASSIFIER_VERSION = 1


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything that decides which classifier comes out of training; its hash names the cache."""

    channels: tuple = (32, 64)
    hidden: int = 128
    epochs: int = 3
    batch_size: int = 128
    lr: float = 3e-3
    augment: bool = True
    seed: int = 0

    def fingerprint(self):
        text = json.dumps({"version": CLASSIFIER_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class DigitClassifier(nn.Module):
    """Two conv-BN-ReLU-pool blocks and a hidden layer whose activations are the FID features."""

    def __init__(self, channels=(32, 64), hidden=128):
        super().__init__()
        c1, c2 = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),  # 14x14
            nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),  # 7x7
            nn.Flatten(),
            nn.Linear(c2 * 7 * 7, hidden), nn.ReLU(),
        )
        self.head = nn.Linear(hidden, 10)

    def features(self, x):
        """Penultimate activations [N, hidden] of images in [0, 1], shaped [N, 784] or [N, 1, 28, 28]."""
        return self.body(x.reshape(-1, 1, 28, 28))

    def forward(self, x):
        return self.head(self.features(x))


def mnist_tensors(root):
    """(train images, train labels, test images, test labels); images [N, 784] float in [0, 1]."""
    train_x, train_y, test_x, test_y = load_mnist_arrays(root)

    def images(x):
        return torch.from_numpy(x.reshape(-1, 784)).float().div_(255.0)

    def labels(y):
        return torch.from_numpy(y.astype("int64"))

    return images(train_x), labels(train_y), images(test_x), labels(test_y)


@torch.no_grad()
def accuracy(model, images, labels, batch_size=1000):
    model.eval()
    device = next(model.parameters()).device
    correct = sum((model(x.to(device)).argmax(1).cpu() == y).sum().item()
                  for x, y in TensorLoader(images, labels, batch_size=batch_size))
    return correct / len(labels)


def train_classifier(config, images, labels, device="cpu"):
    """Train a DigitClassifier on ``images`` [N, 784] in [0, 1]; Adam with a one-cycle schedule.

    Runs on its own RNG stream (seeded by ``config.seed``), so it neither depends on nor disturbs
    the caller's random state, e.g. a model script evaluating in the middle of its training.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        model = DigitClassifier(config.channels, config.hidden).to(device)
        loader = TensorLoader(images, labels, batch_size=config.batch_size, shuffle=True,
                              generator=generator, transform=random_translate if config.augment else None)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr,
                                                       total_steps=config.epochs * len(loader))
        model.train()
        for epoch in range(config.epochs):
            for x, y in loader:
                loss = F.cross_entropy(model(x.to(device)), y.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            print(f"digit classifier: epoch {epoch + 1}/{config.epochs}, last batch loss {loss.item():.4f}")
    return model.eval()


def cache_path(root):
    return Path(root) / "classifier" / "digit_classifier.pt"


def load_classifier(root="./data/", device="cpu", config=ClassifierConfig(), data=None):
    """The cached classifier for ``config``, trained first if the cache is missing or stale.

    ``data`` is (train images, train labels, test images, test labels) as from ``mnist_tensors``;
    by default MNIST under ``root``. The returned module is in eval mode and carries
    ``test_accuracy`` and ``fingerprint`` attributes.
    """
    path = cache_path(root)
    fingerprint = config.fingerprint()
    cached = torch.load(path, map_location=device, weights_only=True) if path.exists() else None
    if cached is not None and cached["fingerprint"] != fingerprint:
        print(f"digit classifier: {path} was trained with another configuration; retraining")
        cached = None
    if cached is None:
        train_x, train_y, test_x, test_y = data if data is not None else mnist_tensors(root)
        start = time.perf_counter()
        model = train_classifier(config, train_x, train_y, device)
        seconds = time.perf_counter() - start
        cached = {"state_dict": model.state_dict(), "fingerprint": fingerprint, "config": asdict(config),
                  "test_accuracy": accuracy(model, test_x, test_y), "train_seconds": seconds}
        atomic_write(path, lambda tmp: torch.save(cached, tmp))
        print(f"digit classifier: test accuracy {cached['test_accuracy']:.2%}, trained in {seconds:.0f} s "
              f"on {device}; cached in {path}")
    model = DigitClassifier(config.channels, config.hidden).to(device)
    model.load_state_dict(cached["state_dict"])
    model.test_accuracy = cached["test_accuracy"]
    model.fingerprint = fingerprint
    return model.eval()

