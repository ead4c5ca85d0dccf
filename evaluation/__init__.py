"""One yardstick for the VAE, the GAN and the flow, which have no common likelihood.

``evaluate_samples`` scores 10,000 model samples in [0, 1] against real MNIST with a digit
classifier of our own (``evaluation.classifier``): FID on its penultimate features, the classifier
("Inception") score, the class histogram of the samples, and the Parzen-window log-likelihood of
real images (Goodfellow et al., 2014, Table 1). The real images are the test set for a reported
number, or the selection reference, a fixed random 10,000 of the training images, for anything
used to choose settings (such as the GAN's progress curve), so that the test set is not chosen on.
``reference_rows`` measures real training images
the same way, which is the ceiling for every measure and, for FID, the floor that two finite real
samples reach. ``python -m evaluation`` evaluates a checkpoint or writes the comparison table.
"""

import functools
import json
import math
from pathlib import Path

import torch

from common import write_json
from evaluation.classifier import ClassifierConfig, load_classifier, mnist_tensors
from evaluation.metrics import (
    DEFAULT_SIGMAS,
    class_fractions,
    classifier_score,
    fid,
    kl_to_uniform,
    parzen_log_likelihood,
    select_sigma,
)

# Bump when a measure changes meaning: cached reference rows are then recomputed.
EVALUATION_VERSION = 1
# The last 10,000 training images (50,000-59,999) choose the Parzen width; the first 10,000 serve
# as real "samples" in the reference row, and a seeded random 10,000 of the first 50,000 are the
# selection reference.
N_VALIDATION = 10_000
N_REFERENCE = 10_000
SELECTION_SEED = 0
REFERENCES = ("test", "selection")


@functools.lru_cache(maxsize=2)
def real_images(root):
    """(training images, validation images, {reference: images}), [N, 784] float in [0, 1], loaded
    once; the references are the test set and the selection subset of the training images."""
    train, _, test, _ = mnist_tensors(root)
    candidates = len(train) - N_VALIDATION
    chosen = torch.randperm(candidates, generator=torch.Generator().manual_seed(SELECTION_SEED))
    selection = train[chosen[:N_REFERENCE].sort().values]
    return train, train[-N_VALIDATION:], {"test": test, "selection": selection}


@torch.no_grad()
def classify(classifier, images, batch_size=1000):
    """(features, logits) of ``images`` [N, 784] in [0, 1], on the CPU."""
    device = next(classifier.parameters()).device
    features, logits = [], []
    for start in range(0, len(images), batch_size):
        batch_features = classifier.features(images[start:start + batch_size].to(device))
        features.append(batch_features.cpu())
        logits.append(classifier.head(batch_features).cpu())
    return torch.cat(features), torch.cat(logits)


@functools.lru_cache(maxsize=4)
def reference_features(classifier, root, reference):
    """The classifier's features of the reference images: computed once per classifier, not once
    per evaluated model (the GAN scores several snapshots)."""
    return classify(classifier, real_images(root)[2][reference])[0]


def evaluate_samples(images, root="./data/", device="cpu", classifier=None, reference="test"):
    """Every sample-based measure of ``images`` [N, 784] or [N, 1, 28, 28], values in [0, 1].

    FID is taken against the 10,000 ``reference`` images ("test", or "selection" for choosing
    settings). The Parzen kernels sit on the samples; their width is chosen on the validation
    images, then the reference images are scored (nats per image). ``classifier`` defaults to the
    cached one under ``root``.
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    images = torch.as_tensor(images).detach().float().cpu().reshape(len(images), 784)
    if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise ValueError(f"samples must be finite and in [0, 1]; got values from {images.min().item()} "
                         f"to {images.max().item()}")
    device = torch.device(device)
    if classifier is None:
        classifier = load_classifier(root, device)
    _, validation, references = real_images(root)
    scored = references[reference]

    features, logits = classify(classifier, images)
    fractions = class_fractions(logits)

    centres = images.to(device)
    sigma, _ = select_sigma(validation.to(device), centres)
    if sigma in (DEFAULT_SIGMAS[0], DEFAULT_SIGMAS[-1]):
        print(f"evaluation: the Parzen width {sigma:.3f} is at the edge of the grid searched; "
              "the log-likelihood may be underestimated")
    scored_ll = parzen_log_likelihood(scored.to(device), centres, [sigma])[0].double().cpu()
    return {
        "reference": reference,
        "fid": fid(features, reference_features(classifier, root, reference)),
        "score": classifier_score(logits),
        "class_fractions": fractions.tolist(),
        "class_kl_uniform": kl_to_uniform(fractions),
        "parzen_ll": scored_ll.mean().item(),
        "parzen_se": scored_ll.std().item() / math.sqrt(len(scored_ll)),
        "parzen_sigma": sigma,
        "n_samples": len(images),
    }


def reference_fingerprint():
    return f"{ClassifierConfig().fingerprint()}-v{EVALUATION_VERSION}"


def reference_rows(root="./data/", device="cpu", cache="results/reference.json"):
    """Real data measured like a model, cached in ``cache`` (recomputed when the classifier or the
    measures change). Returns {"classifier_test_accuracy": float, "rows": [row]}; each row holds
    ``name``, ``label`` and the keys of ``evaluate_samples``."""
    cache = Path(cache)
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("fingerprint") == reference_fingerprint():
            return cached
    classifier = load_classifier(root, device)
    train, _, _ = real_images(root)
    real_train = {"name": "real_train", "label": f"MNIST training images ({N_REFERENCE:,})",
                  **evaluate_samples(train[:N_REFERENCE], root, device, classifier)}
    payload = {"fingerprint": reference_fingerprint(), "classifier_test_accuracy": classifier.test_accuracy,
               "rows": [real_train]}
    write_json(cache, payload)
    return payload
