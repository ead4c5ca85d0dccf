"""The evaluation package on synthetic data with known answers: FID, score, coverage, Parzen
windows, precision and recall, the memorisation check, the committed digit classifier, the
real-image references, evaluate_samples and the command line."""

import json
import math
import sys
import types

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats
import torch

import evaluation
import evaluation.__main__ as cli
import evaluation.classifier as classifier_module
import harness
from evaluation.classifier import ClassifierConfig, DigitClassifier, load_classifier, save_classifier
from evaluation.metrics import (
    class_fractions,
    classifier_score,
    fid,
    frechet_distance,
    kl_to_uniform,
    knn_radii,
    memorised_share,
    nearest_neighbours,
    parzen_log_likelihood,
    precision_recall,
    select_sigma,
)
from harness import files

TINY = ClassifierConfig(channels=(4, 8), hidden=16, epochs=2, batch_size=32, lr=1e-2)


def random_orthogonal(dim, rng):
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q


# ---------------------------------------------------------------- FID

def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8)))
    assert abs(fid(features, features)) < 1e-9 * features.var(0).sum().item()


def test_frechet_distance_matches_closed_form_for_diagonal_and_rotated_gaussians():
    rng = np.random.default_rng(1)
    mean1, mean2 = rng.normal(size=6), rng.normal(size=6)
    var1, var2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = np.sum((mean1 - mean2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert frechet_distance(mean1, np.diag(var1), mean2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)
    # Rotating both Gaussians alike changes no distance.
    q = random_orthogonal(6, rng)
    rotated = frechet_distance(q @ mean1, q @ np.diag(var1) @ q.T, q @ mean2, q @ np.diag(var2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_for_non_commuting_covariances():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    cov1, cov2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mean1, mean2 = rng.normal(size=5), rng.normal(size=5)
    expected = (np.sum((mean1 - mean2) ** 2) + np.trace(cov1 + cov2)
                - 2 * np.trace(scipy.linalg.sqrtm(cov1 @ cov2).real))
    assert frechet_distance(mean1, cov1, mean2, cov2) == pytest.approx(expected, rel=1e-8)


def test_fid_of_samples_approaches_the_distance_between_their_gaussians():
    rng = np.random.default_rng(3)
    mean1, mean2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 1.0, 0.0])
    std1, std2 = np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.5])
    expected = np.sum((mean1 - mean2) ** 2) + np.sum((std1 - std2) ** 2)
    samples1 = torch.from_numpy(mean1 + std1 * rng.normal(size=(50_000, 3)))
    samples2 = torch.from_numpy(mean2 + std2 * rng.normal(size=(50_000, 3)))
    assert fid(samples1, samples2) == pytest.approx(expected, abs=0.05)


# ---------------------------------------------------------------- score and coverage

def confident_logits(labels):
    return 50.0 * torch.nn.functional.one_hot(torch.as_tensor(labels), 10).double()


def test_classifier_score_of_known_cases():
    assert classifier_score(confident_logits(torch.arange(1000) % 10)) == pytest.approx(10, rel=1e-9)
    assert classifier_score(confident_logits(torch.zeros(1000, dtype=torch.long))) == pytest.approx(1)
    assert classifier_score(confident_logits(torch.arange(1000) % 2)) == pytest.approx(2, rel=1e-9)
    # A classifier that cannot tell: p(y|x) = p(y) for every x.
    assert classifier_score(torch.randn(1, 10).repeat(1000, 1)) == pytest.approx(1)


def test_class_fractions_and_their_kl_to_uniform():
    fractions = class_fractions(confident_logits(torch.tensor([0] * 5 + [1] * 5)))
    assert fractions.tolist() == [0.5, 0.5] + [0.0] * 8
    assert kl_to_uniform(fractions) == pytest.approx(math.log(5))
    assert kl_to_uniform(class_fractions(confident_logits(torch.arange(100) % 10))) == pytest.approx(0)
    one_class = class_fractions(confident_logits(torch.full((7,), 3)))
    assert kl_to_uniform(one_class) == pytest.approx(math.log(10))


# ---------------------------------------------------------------- Parzen windows

def test_parzen_with_one_kernel_is_the_gaussian_density():
    rng = np.random.default_rng(4)
    centre = rng.uniform(size=(1, 5))
    x = rng.uniform(size=(40, 5))
    sigmas = [0.1, 0.3, 1.0]
    ll = parzen_log_likelihood(torch.from_numpy(x), torch.from_numpy(centre), sigmas, batch_size=16)
    for sigma, row in zip(sigmas, ll, strict=True):
        expected = scipy.stats.multivariate_normal(centre[0], sigma ** 2 * np.eye(5)).logpdf(x)
        np.testing.assert_allclose(row.numpy(), expected, rtol=1e-10)


def test_parzen_with_distant_kernels_is_their_mixture_density():
    # Centres far apart relative to sigma: most terms fall below the exp clamp and must not matter.
    rng = np.random.default_rng(5)
    centres = rng.uniform(size=(3, 4)) + np.array([[0.0], [3.0], [6.0]])
    x = centres[rng.integers(0, 3, size=30)] + 0.2 * rng.normal(size=(30, 4))
    sigma = 0.15
    ll = parzen_log_likelihood(torch.from_numpy(x), torch.from_numpy(centres), [sigma], batch_size=7)[0]
    kernels = np.stack([scipy.stats.norm(c, sigma).logpdf(x).sum(axis=1) for c in centres])
    np.testing.assert_allclose(ll.numpy(), scipy.special.logsumexp(kernels, axis=0) - math.log(3), rtol=1e-10)


def test_select_sigma_finds_the_width_of_a_toy_mixture():
    # Kernels on the true component means with the true width are the true density, so the
    # validation likelihood peaks at that width.
    rng = np.random.default_rng(6)
    means = 5 * rng.normal(size=(4, 10))
    true_sigma = 0.2
    validation = means[rng.integers(0, 4, size=2000)] + true_sigma * rng.normal(size=(2000, 10))
    sigmas = np.logspace(-2, 0, 21)
    sigma, mean_ll = select_sigma(torch.from_numpy(validation), torch.from_numpy(means), sigmas)
    assert sigma == sigmas[np.argmin(np.abs(np.log(sigmas / true_sigma)))]
    assert len(mean_ll) == len(sigmas)


# ---------------------------------------------------------------- digit classifier

def synthetic_digits(n, seed):
    """Images in [0, 1] whose class is where a bright 5x5 square sits (ten places), on faint noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = 0.2 * torch.rand(n, 28, 28, generator=generator)
    for i, label in enumerate(labels.tolist()):
        top, left = 4 + 14 * (label // 5), 1 + 5 * (label % 5)
        images[i, top:top + 5, left:left + 5] = 1.0
    return images.reshape(n, 784), labels


def test_the_committed_classifier_loads_weights_only_and_matches_its_recorded_hash():
    path = classifier_module.CLASSIFIER_PATH
    assert path.parent.name == "evaluation"
    saved = torch.load(path, weights_only=True)
    assert files.sha256(path.read_bytes()) == classifier_module.recorded_sha256()
    model = load_classifier("cpu")
    assert model.sha256 == classifier_module.recorded_sha256()
    assert model.test_accuracy == saved["test_accuracy"]
    assert model.test_accuracy > 0.99 and not model.training


def test_a_trained_classifier_is_a_new_yardstick_with_its_own_hash_and_a_flipped_byte_is_refused(tmp_path):
    data = (*synthetic_digits(400, seed=0), *synthetic_digits(100, seed=1))
    path = tmp_path / "digit_classifier.pt"
    digest = save_classifier(TINY, path, data=data)
    assert (tmp_path / "digit_classifier.pt.sha256").read_text() == f"{digest}  digit_classifier.pt\n"
    assert digest == files.sha256(path.read_bytes()) != classifier_module.recorded_sha256()
    model = load_classifier("cpu", path)
    assert model.sha256 == digest and model.test_accuracy > 0.9
    images = data[2][:8]
    with torch.no_grad():
        assert model.features(images).shape == (8, 16)
        assert torch.equal(model(images.reshape(8, 1, 28, 28)), model(images))

    corrupted = bytearray(path.read_bytes())
    corrupted[len(corrupted) // 2] ^= 1
    path.write_bytes(bytes(corrupted))
    with pytest.raises(harness.RunError, match="SHA-256 .* not the .* recorded for it"):
        load_classifier("cpu", path)
    (tmp_path / "digit_classifier.pt.sha256").unlink()
    with pytest.raises(harness.RunError, match="sha256 is missing"):
        load_classifier("cpu", path)


def test_classifier_training_leaves_the_global_random_state_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    classifier_module.train_classifier(TINY, *synthetic_digits(40, seed=0))
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------- evaluate_samples and the command line

def small_classifier(sha256="small"):
    torch.manual_seed(0)
    model = DigitClassifier(channels=(4, 8), hidden=16).eval()
    model.sha256 = sha256
    return model


def test_evaluate_samples_of_the_test_images_themselves(fake_mnist_root, small_splits):
    _, validation, references = evaluation.real_images(fake_mnist_root)
    test = references["test"]
    result = evaluation.evaluate_samples(test.reshape(-1, 1, 28, 28), fake_mnist_root, "cpu",
                                         small_classifier())
    assert set(result) == {"reference", "classifier_sha256", "fid", "score", "class_fractions",
                           "class_kl_uniform", "parzen_ll", "parzen_se", "parzen_sigma", "precision",
                           "recall", "memorisation", "n_samples"}
    assert result["reference"] == "test" and result["n_samples"] == len(test) == 30
    assert result["classifier_sha256"] == "small"
    assert abs(result["fid"]) < 1e-9  # the very images FID compares against
    assert result["precision"] == result["recall"] == 1.0
    # The test images are the yardstick of memorisation: 1% of them lie below its threshold.
    for space in ("pixel", "feature"):
        assert result["memorisation"][space]["share"] <= 0.01 + 1 / 30
        assert result["memorisation"][space]["median_sample"] == result["memorisation"][space]["median_test"]
    assert 1 <= result["score"] <= 10
    assert sum(result["class_fractions"]) == pytest.approx(1)
    assert result["class_kl_uniform"] == pytest.approx(kl_to_uniform(result["class_fractions"]))
    # The kernel width is the one the validation images choose; the test images are then scored.
    assert result["parzen_sigma"] == select_sigma(validation, test)[0]
    ll = parzen_log_likelihood(test, test, [result["parzen_sigma"]])[0].double()
    assert result["parzen_ll"] == pytest.approx(ll.mean().item(), rel=1e-6)
    assert result["parzen_se"] == pytest.approx(ll.std().item() / math.sqrt(len(test)), rel=1e-6)


def rows_of(images, pool):
    """For each row of ``images``, the index of the equal row of ``pool`` (-1 if there is none)."""
    matches = (images[:, None, :] == pool[None, :, :]).all(-1)
    return torch.where(matches.any(1), matches.float().argmax(1), -1)


def test_the_selection_reference_is_training_images_apart_from_test_and_validation(fake_mnist_root,
                                                                                   small_splits):
    train, validation, references = evaluation.real_images(fake_mnist_root)
    selection = references["selection"]
    assert selection.shape == (30, 784)
    chosen = rows_of(selection, train)
    assert (chosen >= 0).all() and (chosen < 80).all()  # from the training images before the last 40
    assert len(set(chosen.tolist())) == 30 and torch.equal(chosen, chosen.sort().values)
    assert (rows_of(selection, validation) == -1).all()
    assert (rows_of(selection, references["test"]) == -1).all()
    assert torch.equal(validation, train[-40:])

    # Scored against the selection, the selection's own images have FID 0 and its Parzen score.
    classifier = small_classifier()
    result = evaluation.evaluate_samples(selection, fake_mnist_root, "cpu", classifier, reference="selection")
    assert result["reference"] == "selection" and abs(result["fid"]) < 1e-9
    ll = parzen_log_likelihood(selection, selection, [result["parzen_sigma"]])[0].double()
    assert result["parzen_ll"] == pytest.approx(ll.mean().item(), rel=1e-6)
    against_test = evaluation.evaluate_samples(selection, fake_mnist_root, "cpu", classifier)
    features = {name: evaluation.classify(classifier, images)[0]
                for name, images in (("selection", selection), ("test", references["test"]))}
    assert against_test["reference"] == "test" and against_test["fid"] > 1e-6
    assert against_test["fid"] == pytest.approx(fid(features["selection"], features["test"]), rel=1e-6)
    assert against_test["parzen_sigma"] == result["parzen_sigma"]  # chosen on the same validation images


def test_the_selection_of_real_mnist_is_a_seeded_10000_of_the_first_50000(tmp_path, monkeypatch):
    """With MNIST's sizes (images stood in for by their index): the Parzen-width images are training
    images 50,000-59,999 and the selection 10,000 distinct ones below 50,000, the same on every load."""
    train = torch.arange(60_000, dtype=torch.float64)[:, None]
    test = -torch.arange(1, 10_001, dtype=torch.float64)[:, None]
    monkeypatch.setattr(evaluation, "mnist_tensors", lambda root: (train, None, test, None))
    _, validation, references = evaluation.real_images(str(tmp_path / "a"))
    assert torch.equal(validation[:, 0], torch.arange(50_000, 60_000, dtype=torch.float64))
    chosen = references["selection"][:, 0]
    assert len(chosen) == 10_000 and len(chosen.unique()) == 10_000
    assert chosen.min() >= 0 and chosen.max() < 50_000 and torch.equal(chosen, chosen.sort().values)
    assert chosen.max() > 45_000 and chosen.min() < 5_000  # spread over all 50,000, not a block
    assert torch.equal(references["test"], test)
    again = evaluation.real_images(str(tmp_path / "b"))[2]["selection"]
    assert torch.equal(again, references["selection"])


def test_reference_features_are_computed_once_per_classifier_and_reference(fake_mnist_root, small_splits,
                                                                           monkeypatch):
    classified = []
    classify = evaluation.classify
    monkeypatch.setattr(evaluation, "classify", lambda classifier, images: classified.append(len(images))
                        or classify(classifier, images))
    classifier = small_classifier()
    images = torch.rand(20, 784, generator=torch.Generator().manual_seed(0))
    for reference in ("test", "selection", "test", "selection"):
        evaluation.evaluate_samples(images, fake_mnist_root, "cpu", classifier, reference=reference)
    # Each call classifies its 20 samples; the 30 test and 30 selection images are classified once each,
    # and the 120 training images once, for the memorisation check of the first "test" call.
    assert classified == [20, 30, 120, 20, 30, 20, 20]


def test_evaluate_samples_rejects_images_outside_the_unit_interval(fake_mnist_root, small_splits):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluation.evaluate_samples(torch.full((10, 784), -1.0), fake_mnist_root, "cpu", small_classifier())


def test_evaluate_samples_rejects_an_unknown_reference(fake_mnist_root):
    with pytest.raises(ValueError, match="reference must be one of"):
        evaluation.evaluate_samples(torch.rand(10, 784), fake_mnist_root, "cpu", small_classifier(),
                                    reference="train")


def test_cli_evaluates_a_checkpoint_through_the_scripts_sampler(fake_mnist_root, small_splits, tmp_path,
                                                                monkeypatch, capsys):
    test = evaluation.real_images(fake_mnist_root)[2]["test"]
    calls = []

    def load_sampler(checkpoint, device):
        calls.append(checkpoint)
        return lambda n: test[:n]

    monkeypatch.setitem(sys.modules, "a3_vae_template", types.SimpleNamespace(load_sampler=load_sampler))
    monkeypatch.setattr(evaluation, "load_classifier", lambda device: small_classifier())
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    cli.main(["--model", "vae", "--checkpoint", str(checkpoint), "--n-samples", "20",
              "--data-root", str(fake_mnist_root), "--device", "cpu"])
    assert calls == [str(checkpoint)]
    written = json.loads((checkpoint.parent / "evaluation.json").read_text())
    assert written["model"] == "vae" and written["n_samples"] == 20 and written["reference"] == "test"
    assert "vae: FID" in capsys.readouterr().out
    assert all((checkpoint.parent / f"memorisation.{kind}").exists() for kind in ("png", "pdf"))


def test_reference_rows_are_the_mean_and_sd_of_random_subsets_cached_until_the_classifier_changes(
        fake_mnist_root, small_splits, tmp_path, monkeypatch):
    classifier = small_classifier("first")
    monkeypatch.setattr(evaluation, "load_classifier", lambda device: classifier)
    monkeypatch.setattr(DigitClassifier, "test_accuracy", 0.5, raising=False)
    evaluated = []
    evaluate = evaluation.evaluate_samples
    monkeypatch.setattr(evaluation, "evaluate_samples", lambda images, *args, **kwargs: evaluated.append(
        images) or evaluate(images, *args, **kwargs))
    cache = tmp_path / "reference.json"

    first = evaluation.reference_rows(fake_mnist_root, "cpu", cache)
    train = evaluation.real_images(fake_mnist_root)[0]
    assert len(evaluated) == len(evaluation.REAL_SEEDS) == 5
    for images, seed in zip(evaluated, evaluation.REAL_SEEDS, strict=True):
        assert torch.equal(images, evaluation.training_subset(train, seed))
        chosen = rows_of(images, train)
        assert len(images) == 30 and (chosen >= 0).all() and (chosen < 80).all()  # not the Parzen images
    assert not torch.equal(evaluated[0], evaluated[1])
    rows = [evaluate(images, fake_mnist_root, "cpu", classifier, check_memorisation=False)
            for images in evaluated]
    (row,) = first["rows"]
    assert row["name"] == "real_train" and row["n_subsets"] == 5 and row["n_samples"] == 30
    assert "memorisation" not in row and row["classifier_sha256"] == "first"
    for key in ("fid", "precision", "recall", "score", "parzen_ll"):
        values = torch.tensor([r[key] for r in rows], dtype=torch.float64)
        assert row[key] == pytest.approx(values.mean().item())
        assert row[f"{key}_sd"] == pytest.approx(values.std().item())
    assert row["fid_sd"] > 0 and first["classifier_test_accuracy"] == 0.5

    assert evaluation.reference_rows(fake_mnist_root, "cpu", cache) == first
    assert len(evaluated) == 5
    classifier.sha256 = "retrained"  # other weights: a new yardstick, the cache no longer holds
    again = evaluation.reference_rows(fake_mnist_root, "cpu", cache)
    assert again["rows"][0]["classifier_sha256"] == "retrained"
    assert len(evaluated) == 10


# ---------------------------------------------------------------- precision, recall and memorisation

def test_knn_radii_are_the_distance_to_the_kth_other_point():
    points = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(points, k=1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(points, k=2, chunk=3).tolist() == [3.0, 2.0, 3.0, 6.0]


def test_precision_and_recall_of_point_clouds_with_known_answers():
    generator = torch.Generator().manual_seed(0)
    real = torch.rand(4000, 2, generator=generator)
    assert precision_recall(real, real) == (1.0, 1.0)
    # Samples on the left half of the real support: all realistic, half the real data covered (the
    # k-NN balls' finite-sample holes at the border lose a little precision).
    half = torch.rand(4000, 2, generator=generator) * torch.tensor([0.5, 1.0])
    precision, recall = precision_recall(real, half)
    assert precision > 0.97 and recall == pytest.approx(0.5, abs=0.03)
    assert precision_recall(real, real + 2.0) == (0.0, 0.0)


def test_nearest_neighbours_finds_the_nearest_point_and_its_distance():
    points = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
    queries = torch.tensor([[3.0, 4.0], [9.0, 0.0], [0.0, 1.0]])
    distances, indices = nearest_neighbours(queries, points, chunk=2)
    assert indices.tolist() == [1, 2, 0]
    assert distances.tolist() == pytest.approx([0.0, 1.0, 1.0], abs=1e-3)


def test_memorised_share_is_one_for_copies_and_one_percent_for_fresh_draws():
    generator = torch.Generator().manual_seed(0)
    train, test, fresh = (torch.randn(5000, 20, generator=generator) for _ in range(3))
    test_distances = nearest_neighbours(test, train)[0]
    copies, threshold = memorised_share(nearest_neighbours(train[:2000], train)[0], test_distances)
    assert copies == 1.0 and threshold == torch.quantile(test_distances.double(), 0.01).item()
    share, _ = memorised_share(nearest_neighbours(fresh, train)[0], test_distances)
    assert share == pytest.approx(0.01, abs=0.005)


def test_memorisation_check_of_copied_training_images_draws_its_figure(fake_mnist_root, small_splits,
                                                                       tmp_path):
    train = evaluation.real_images(fake_mnist_root)[0]
    result = evaluation.evaluate_samples(train[:60], fake_mnist_root, "cpu", small_classifier(), out=tmp_path)
    for space in ("pixel", "feature"):
        assert result["memorisation"][space]["share"] == 1.0
        checked = result["memorisation"][space]
        assert checked["median_sample"] < 1e-2 < checked["threshold"]
    assert (tmp_path / "memorisation.png").exists() and (tmp_path / "memorisation.pdf").exists()
    selection = evaluation.evaluate_samples(train[:60], fake_mnist_root, "cpu", small_classifier(),
                                            reference="selection")
    assert "memorisation" not in selection  # progress curves skip it
