"""One yardstick for the VAE, the GAN and the flow, which have no common likelihood.

``evaluate_samples`` scores 10,000 model samples in [0, 1] against real MNIST with the committed
digit classifier (``evaluation.classifier``): FID on its penultimate features, the classifier
("Inception") score, the class histogram of the samples, the Parzen-window log-likelihood of real
images (Goodfellow et al., 2014, Table 1), precision and recall in the classifier's features
(Kynkäänniemi et al., 2019), and, for reported numbers, a memorisation check: how many samples lie
nearer to a training image than held-out test images do. The real images are the test set for a
reported number, or the selection reference, a fixed random 10,000 of the training images, for
anything used to choose settings (such as the GAN's progress curve), so that the test set is not
chosen on. ``reference_rows`` measures random subsets of the training images the same way: the
ceiling for every measure and, for FID, the floor that two finite real samples reach. Every row
records the SHA-256 of the classifier that scored it. ``python -m evaluation`` evaluates a
checkpoint or writes the comparison table.
"""

import functools
import json
import math
from pathlib import Path

import torch

from evaluation.classifier import load_classifier, mnist_tensors
from evaluation.figures import save_memorisation_figure
from evaluation.metrics import (
    DEFAULT_SIGMAS,
    class_fractions,
    classifier_score,
    fid,
    kl_to_uniform,
    memorised_share,
    nearest_neighbours,
    parzen_log_likelihood,
    precision_recall,
    select_sigma,
)
from harness.files import atomic_write, write_json

# Bump when a measure changes meaning: cached reference rows are then recomputed.
EVALUATION_VERSION = 2
# The last 10,000 training images (50,000-59,999) choose the Parzen width; seeded random 10,000 of
# the first 50,000 are the selection reference (seed SELECTION_SEED) and the real "samples" of the
# reference rows (one subset per seed in REAL_SEEDS: a contiguous block is not a random sample).
N_VALIDATION = 10_000
N_REFERENCE = 10_000
SELECTION_SEED = 0
REAL_SEEDS = (1, 2, 3, 4, 5)
REFERENCES = ("test", "selection")
NEIGHBOURS = 3  # k of precision and recall, as Kynkäänniemi et al. (2019) recommend
# A sample counts as memorised when it is nearer to a training image than 99% of test images are.
MEMORISED_QUANTILE = 0.01


@functools.lru_cache(maxsize=2)
def real_images(root):
    """(training images, validation images, {reference: images}), [N, 784] float in [0, 1], loaded
    once; the references are the test set and the selection subset of the training images."""
    train, _, test, _ = mnist_tensors(root)
    return train, train[-N_VALIDATION:], {"test": test, "selection": training_subset(train, SELECTION_SEED)}


def training_subset(train, seed):
    """A seeded random N_REFERENCE of the training images before the Parzen-width ones, in order."""
    chosen = torch.randperm(len(train) - N_VALIDATION, generator=torch.Generator().manual_seed(seed))
    return train[chosen[:N_REFERENCE].sort().values]


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


# The caches below are keyed on the classifier module, which carries its weights' SHA-256: a process
# that loads another classifier gets other entries.
@functools.lru_cache(maxsize=4)
def reference_features(classifier, root, reference):
    """The classifier's features of the reference images: computed once per classifier, not once
    per evaluated model (the GAN scores several snapshots)."""
    return classify(classifier, real_images(root)[2][reference])[0]


def on_disk(name, classifier, root, compute):
    """``compute()``, cached as ``<root>/evaluation_cache/<name>-<key>.pt``, keyed on the classifier's
    SHA-256 and the measures' version: every model script needs the same training-set values."""
    path = Path(root) / "evaluation_cache" / f"{name}-{reference_key(classifier.sha256)}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    value = compute()
    atomic_write(path, lambda tmp: torch.save(value, tmp))
    return value


@functools.lru_cache(maxsize=2)
def training_features(classifier, root):
    return on_disk("training_features", classifier, root,
                   lambda: classify(classifier, real_images(root)[0])[0])


@functools.lru_cache(maxsize=2)
def test_to_training(classifier, root):
    """{space: distance of each test image to its nearest training image}, in pixel space and in
    the classifier's feature space: how near unseen real images come, the memorisation yardstick."""
    def compute():
        train, _, references = real_images(root)
        return {"pixel": nearest_neighbours(references["test"], train)[0],
                "feature": nearest_neighbours(reference_features(classifier, root, "test"),
                                              training_features(classifier, root))[0]}
    return on_disk("test_to_training", classifier, root, compute)


def memorisation(images, features, classifier, root, out=None):
    """For pixel and feature space: the share of samples nearer to their nearest training image than
    99% of test images are to theirs (about 0.01 for a model that does not copy, 1 for copies), the
    threshold, and the median distances of samples and of test images. With ``out``, draws
    ``<out>/memorisation`` (the distance distributions and the closest samples beside their
    nearest training images)."""
    train = real_images(root)[0]
    test_distances = test_to_training(classifier, root)
    spaces = {"pixel": (images, train), "feature": (features, training_features(classifier, root))}
    nearest, result = {}, {}
    for space, (queries, points) in spaces.items():
        nearest[space] = nearest_neighbours(queries, points)
        share, threshold = memorised_share(nearest[space][0], test_distances[space], MEMORISED_QUANTILE)
        result[space] = {"share": share, "threshold": threshold,
                         "median_sample": nearest[space][0].median().item(),
                         "median_test": test_distances[space].median().item()}
    if out is not None:
        save_memorisation_figure(images, train, nearest, test_distances, result, Path(out) / "memorisation")
    return result


def evaluate_samples(images, root="./data/", device="cpu", classifier=None, reference="test", out=None,
                     check_memorisation=True):
    """Every sample-based measure of ``images`` [N, 784] or [N, 1, 28, 28], values in [0, 1].

    FID, precision and recall are taken against the 10,000 ``reference`` images ("test", or
    "selection" for choosing settings). The Parzen kernels sit on the samples; their width is chosen
    on the validation images, then the reference images are scored (nats per image). The
    memorisation check runs for reported numbers (reference "test") unless ``check_memorisation``
    is False, and draws its figure into ``out`` when given. ``classifier`` defaults to the
    committed one.
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    images = torch.as_tensor(images).detach().float().cpu().reshape(len(images), 784)
    if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise ValueError(f"samples must be finite and in [0, 1]; got values from {images.min().item()} "
                         f"to {images.max().item()}")
    device = torch.device(device)
    if classifier is None:
        classifier = load_classifier(device)
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
    real_features = reference_features(classifier, root, reference)
    precision, recall = precision_recall(real_features, features, NEIGHBOURS)
    row = {
        "reference": reference,
        "classifier_sha256": classifier.sha256,
        "fid": fid(features, real_features),
        "score": classifier_score(logits),
        "class_fractions": fractions.tolist(),
        "class_kl_uniform": kl_to_uniform(fractions),
        "parzen_ll": scored_ll.mean().item(),
        "parzen_se": scored_ll.std().item() / math.sqrt(len(scored_ll)),
        "parzen_sigma": sigma,
        "precision": precision,
        "recall": recall,
        "n_samples": len(images),
    }
    if check_memorisation and reference == "test":
        row["memorisation"] = memorisation(images, features, classifier, root, out)
    return row


def reference_key(classifier_sha256):
    """What the cached reference rows depend on: the classifier's weights and the measures' version."""
    return f"{classifier_sha256}-v{EVALUATION_VERSION}"


def mean_and_sd(rows):
    """One row of the means of ``rows``' numbers (element-wise for lists), with ``<key>_sd``, the
    standard deviation over the rows, beside every float; other values from the first row."""
    summary = {}
    for key, first in rows[0].items():
        values = torch.tensor([row[key] for row in rows], dtype=torch.float64) \
            if isinstance(first, (float, list)) else None
        if isinstance(first, float):
            summary[key], summary[f"{key}_sd"] = values.mean().item(), values.std().item()
        elif isinstance(first, list):
            summary[key] = values.mean(0).tolist()
        else:
            summary[key] = first
    return summary


def reference_rows(root="./data/", device="cpu", cache="results/reference.json"):
    """Real data measured like a model, cached in ``cache`` (recomputed when the classifier's weights
    or the measures change): each of len(REAL_SEEDS) random 10,000-image subsets of the training
    images is scored as samples, and the row holds the mean and standard deviation over them (no
    memorisation check: training images are their own nearest training image). Returns
    {"classifier_test_accuracy": float, "rows": [row]}; each row holds ``name``, ``label`` and the
    keys of ``evaluate_samples``."""
    cache = Path(cache)
    classifier = load_classifier(device)
    key = reference_key(classifier.sha256)
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached
    train = real_images(root)[0]
    rows = [evaluate_samples(training_subset(train, seed), root, device, classifier, check_memorisation=False)
            for seed in REAL_SEEDS]
    real_train = {"name": "real_train", "n_subsets": len(rows),
                  "label": f"MNIST training images ({len(rows)} random {N_REFERENCE:,}, mean ± sd)",
                  **mean_and_sd(rows)}
    payload = {"key": key, "classifier_test_accuracy": classifier.test_accuracy, "rows": [real_train]}
    write_json(cache, payload)
    return payload
