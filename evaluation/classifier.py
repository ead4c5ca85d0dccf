"""A small digit classifier: the feature extractor and judge behind FID, score, class coverage and
precision and recall.

An ImageNet Inception network would need downloaded weights and knows nothing of digits, so we
trained our own convnet on the MNIST training split: above 99% test accuracy in a few CPU minutes.
Its weights are committed as ``evaluation/digit_classifier.pt`` with their SHA-256 beside them
(``digit_classifier.pt.sha256``): a yardstick must be the same on every machine, and retraining,
even with the same configuration, gives other weights and other numbers. Retraining
(``python -m evaluation --train-classifier``) makes a new yardstick with a new hash.
"""

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from datasets.loader import TensorLoader
from datasets.mnist import random_translate
from datasets.raw import load_mnist_arrays
from harness.files import RunError, atomic_write, load_verified, save_weights

CLASSIFIER_PATH = Path(__file__).with_name("digit_classifier.pt")


@dataclass(frozen=True)
class ClassifierConfig:
    """How the classifier is trained (the committed one was trained with these defaults)."""

    channels: tuple = (32, 64)
    hidden: int = 128
    epochs: int = 3
    batch_size: int = 128
    lr: float = 3e-3
    augment: bool = True
    seed: int = 0


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


def recorded_sha256(path=CLASSIFIER_PATH):
    """The SHA-256 committed beside the classifier's weights, in ``<path>.sha256`` ("<hex>  <name>",
    as ``sha256sum`` writes it, so ``sha256sum -c`` checks it too)."""
    sidecar = Path(f"{path}.sha256")
    if not sidecar.exists():
        raise RunError(f"{sidecar} is missing: restore it with git checkout, or retrain the classifier "
                       "with python -m evaluation --train-classifier")
    return sidecar.read_text().split()[0]


def save_classifier(config=ClassifierConfig(), path=CLASSIFIER_PATH, root="./data/", device="cpu", data=None):
    """Train a classifier for ``config`` and write its weights and their SHA-256 to ``path``: a new
    yardstick, so every run scored with the old one must be scored again before the table mixes them.
    ``data`` is (train images, train labels, test images, test labels) as from ``mnist_tensors``; by
    default MNIST under ``root``. Returns the SHA-256."""
    train_x, train_y, test_x, test_y = data if data is not None else mnist_tensors(root)
    start = time.perf_counter()
    model = train_classifier(config, train_x, train_y, device)
    seconds = time.perf_counter() - start
    payload = {"state_dict": model.state_dict(), "config": asdict(config),
               "test_accuracy": accuracy(model, test_x, test_y), "train_seconds": seconds}
    digest = save_weights(path, payload)
    atomic_write(f"{path}.sha256", lambda tmp: Path(tmp).write_text(f"{digest}  {Path(path).name}\n"))
    print(f"digit classifier: test accuracy {payload['test_accuracy']:.2%}, trained in {seconds:.0f} s on "
          f"{device}; written to {path} (SHA-256 {digest[:16]})")
    return digest


def load_classifier(device="cpu", path=CLASSIFIER_PATH):
    """The classifier in ``path``, once its bytes match the SHA-256 committed beside it. The returned
    module is in eval mode and carries ``test_accuracy`` and ``sha256``: every measure made with it
    records that hash, and the comparison table refuses rows scored by different classifiers."""
    digest = recorded_sha256(path)
    saved = load_verified(path, digest, device)
    config = saved["config"]
    model = DigitClassifier(tuple(config["channels"]), config["hidden"]).to(device)
    model.load_state_dict(saved["state_dict"])
    model.test_accuracy = saved["test_accuracy"]
    model.sha256 = digest
    return model.eval()
