"""The evaluation package on synthetic data with known answers: FID, score, coverage, Parzen
windows, the cached digit classifier, the real-image references, evaluate_samples, the comparison and
ablation tables and the command line."""

import json
import math
import os
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
from evaluation.classifier import ClassifierConfig, DigitClassifier, load_classifier
from evaluation.metrics import (
    class_fractions,
    classifier_score,
    fid,
    frechet_distance,
    kl_to_uniform,
    parzen_log_likelihood,
    select_sigma,
)
from evaluation.table import MODEL_ORDER, write_ablation_table, write_table

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


def test_classifier_trains_caches_reloads_and_retrains_when_its_configuration_changes(tmp_path, monkeypatch):
    data = (*synthetic_digits(400, seed=0), *synthetic_digits(100, seed=1))
    trainings = []
    train = classifier_module.train_classifier
    monkeypatch.setattr(classifier_module, "train_classifier",
                        lambda *args, **kwargs: trainings.append(args[0]) or train(*args, **kwargs))

    model = load_classifier(tmp_path, "cpu", TINY, data)
    cache = classifier_module.cache_path(tmp_path)
    assert trainings == [TINY] and cache.exists()
    assert model.test_accuracy > 0.9
    assert torch.load(cache, weights_only=True)["test_accuracy"] == model.test_accuracy

    images = data[2][:8]
    with torch.no_grad():
        assert model.features(images).shape == (8, 16)
        logits = model(images)
        assert torch.equal(model(images.reshape(8, 1, 28, 28)), logits)
        reloaded = load_classifier(tmp_path, "cpu", TINY, data)
        assert trainings == [TINY]
        assert torch.equal(reloaded(images), logits)

    changed = ClassifierConfig(**{**TINY.__dict__, "seed": 1})
    assert changed.fingerprint() != TINY.fingerprint()
    load_classifier(tmp_path, "cpu", changed, data)
    assert trainings == [TINY, changed]
    assert torch.load(cache, weights_only=True)["fingerprint"] == changed.fingerprint()


def test_classifier_training_leaves_the_global_random_state_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    classifier_module.train_classifier(TINY, *synthetic_digits(40, seed=0))
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------- evaluate_samples and the command line

def small_classifier():
    torch.manual_seed(0)
    return DigitClassifier(channels=(4, 8), hidden=16).eval()


def test_evaluate_samples_of_the_test_images_themselves(fake_mnist_root, small_splits):
    _, validation, references = evaluation.real_images(fake_mnist_root)
    test = references["test"]
    result = evaluation.evaluate_samples(test.reshape(-1, 1, 28, 28), fake_mnist_root, "cpu",
                                         small_classifier())
    assert set(result) == {"reference", "fid", "score", "class_fractions", "class_kl_uniform", "parzen_ll",
                           "parzen_se", "parzen_sigma", "n_samples"}
    assert result["reference"] == "test" and result["n_samples"] == len(test) == 30
    assert abs(result["fid"]) < 1e-9  # the very images FID compares against
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
    # Each call classifies its 20 samples; the 30 test and 30 selection images are classified once each.
    assert classified == [20, 30, 20, 30, 20, 20]


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
    monkeypatch.setattr(evaluation, "load_classifier", lambda root, device: small_classifier())
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    cli.main(["--model", "vae", "--checkpoint", str(checkpoint), "--n-samples", "20",
              "--data-root", str(fake_mnist_root), "--device", "cpu"])
    assert calls == [str(checkpoint)]
    written = json.loads((checkpoint.parent / "evaluation.json").read_text())
    assert written["model"] == "vae" and written["n_samples"] == 20 and written["reference"] == "test"
    assert "vae: FID" in capsys.readouterr().out


def test_reference_rows_are_cached_until_the_fingerprint_changes(fake_mnist_root, small_splits, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setattr(evaluation, "load_classifier", lambda root, device: small_classifier())
    monkeypatch.setattr(DigitClassifier, "test_accuracy", 0.5, raising=False)
    evaluated = []
    evaluate = evaluation.evaluate_samples
    monkeypatch.setattr(evaluation, "evaluate_samples",
                        lambda images, *args: evaluated.append(len(images)) or evaluate(images, *args))
    cache = tmp_path / "reference.json"

    first = evaluation.reference_rows(fake_mnist_root, "cpu", cache)
    n_train = evaluation.N_REFERENCE  # the first training images, as samples
    assert evaluated == [n_train]
    assert [row["name"] for row in first["rows"]] == ["real_train"]
    assert first["rows"][0]["n_samples"] == n_train and first["classifier_test_accuracy"] == 0.5
    assert first["rows"][0]["reference"] == "test"

    assert evaluation.reference_rows(fake_mnist_root, "cpu", cache) == first
    assert evaluated == [n_train]

    monkeypatch.setattr(evaluation, "EVALUATION_VERSION", evaluation.EVALUATION_VERSION + 1)
    evaluation.reference_rows(fake_mnist_root, "cpu", cache)
    assert evaluated == [n_train, n_train]


def fake_evaluation(fid_value):
    return {"fid": fid_value, "score": 9.5, "class_fractions": [0.05] + [0.95 / 9] * 9,
            "class_kl_uniform": 0.0123, "parzen_ll": 225.04, "parzen_se": 2.01, "parzen_sigma": 0.17,
            "n_samples": 10_000}


def write_metrics(results, name, test, fid_value=1.0, **extra):
    metrics = {"args": {}, "n_params": 1234567, "wall_time_s": 600.0, "test": test,
               "evaluation": fake_evaluation(fid_value), **extra}
    (results / name).mkdir(parents=True)
    (results / name / "metrics.json").write_text(json.dumps(metrics))


def test_table_lists_every_run_in_order_with_its_own_likelihood_and_the_reference(tmp_path, capsys):
    results = tmp_path / "results"
    write_metrics(results, "nf", {"bpd": 1.0512}, fid_value=4.0)
    write_metrics(results, "gan", {}, fid_value=3.0)
    write_metrics(results, "vae_z2", {"negative_elbo": 140.3}, fid_value=2.0)
    vae_test = {"negative_elbo": 97.123, "nll_importance": 91.5, "importance_samples": 500}
    write_metrics(results, "vae", vae_test, fid_value=1.0, args={"zdim": 20})
    # The GAN was re-evaluated from its checkpoint after training: the newer evaluation.json wins.
    (results / "gan" / "evaluation.json").write_text(json.dumps(fake_evaluation(30.0)))
    metrics_time = os.stat(results / "gan" / "metrics.json").st_mtime
    os.utime(results / "gan" / "evaluation.json", (metrics_time + 10, metrics_time + 10))
    reference = {"name": "real_train", "label": "MNIST training images (10,000)", **fake_evaluation(0.5)}
    (results / "reference.json").write_text(json.dumps(
        {"fingerprint": evaluation.reference_fingerprint(), "classifier_test_accuracy": 0.9912,
         "rows": [reference]}))

    cli.main(["--table", "--results", str(results), "--device", "cpu"])

    rows = json.loads((results / "comparison.json").read_text())["rows"]
    assert [row["name"] for row in rows] == ["vae", "vae_z2", "gan", "nf", "real_train"]
    assert [row["fid"] for row in rows] == [1.0, 2.0, 30.0, 4.0, 0.5]
    assert [row["reference"] for row in rows] == [False] * 4 + [True]
    table = (results / "comparison.md").read_text()
    lines = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert "−ELBO 97.12 nats, NLL 91.50 nats (K=500)" in lines["| VAE (z=20)"]
    assert "−ELBO 140.30 nats |" in lines["| VAE (z=2)"]
    assert "| 30.00 |" in lines["| GAN"] and "| n/a |" in lines["| GAN"]
    assert "1.051 bits/dim" in lines["| RealNVP flow"]
    assert "| 225.0 ± 2.0 |" in lines["| VAE (z=20)"] and "| 5.0 / 10.6 |" in lines["| VAE (z=20)"]
    assert "| 1,234,567 | 10.0 min |" in lines["| VAE (z=20)"]
    assert "| MNIST training images (10,000) | 0.50 |" in table
    assert "99.12%" in table
    assert table in capsys.readouterr().out


def test_table_shows_runs_without_an_evaluation_as_not_available(tmp_path):
    results = tmp_path / "results"
    (results / "nf").mkdir(parents=True)
    (results / "nf" / "metrics.json").write_text(json.dumps({"test": {"bpd": 1.1}, "n_params": 10}))
    rows = write_table(results, {"rows": []})
    assert rows[0]["fid"] is None and rows[0]["wall_time_s"] is None
    line = (results / "comparison.md").read_text().splitlines()[4]
    assert line == "| RealNVP flow | n/a | n/a | n/a | n/a | n/a | 1.100 bits/dim | 10 | n/a |"


def test_the_assignments_runs_come_first_in_their_order(tmp_path):
    assert MODEL_ORDER == ("vae", "vae_z2", "gan", "nf")
    results = tmp_path / "results"
    for name in ("zeta", "nf", "alpha", "vae_z2", "gan", "vae"):
        write_metrics(results, name, {})
    assert [row["name"] for row in write_table(results, {"rows": []})] == ["vae", "vae_z2", "gan", "nf",
                                                                          "alpha", "zeta"]


def test_ablation_table_has_one_row_per_ablation_with_its_note(tmp_path):
    results = tmp_path / "results"
    folder = results / "ablations"
    runs = {
        "gan_batch_64": {"evaluation": fake_evaluation(9.87), "wall_time_s": 1800.0, "device": "cpu",
                         "progress": [{"epoch": 10, "fid": 12.0}, {"epoch": 50, "fid": 8.5},
                                      {"epoch": 100, "fid": 9.0}], "git_commit": "abcdef1234567890"},
        "nf_lr": {"curves": {"val_bpd": [1.2, 1.0512]}, "test": {"bpd": 1.0498}, "wall_time_s": 600.0,
                  "device": "cuda", "git_commit": "1234567deadbeef-dirty"},
        "gan_old": {},
    }
    for name, metrics in runs.items():
        (folder / name).mkdir(parents=True)
        (folder / name / "metrics.json").write_text(json.dumps(metrics))
    notes = {"gan_batch_64": {"changes": "batch 64", "also": "seed 1"}}
    (folder / "notes.json").write_text(json.dumps(notes))
    write_ablation_table(results)

    lines = (results / "ablations.md").read_text().splitlines()
    assert lines[0] == "# Ablations and seed studies"
    assert lines[4].startswith("| run | compared with the default, it changes | also differs |")
    assert lines[6:] == [
        "| `gan_batch_64` | batch 64 | seed 1 | 9.87 | 8.50 (50) | n/a | 30.0 min | `abcdef1` |",
        "| `gan_old` |  |  | n/a | n/a | n/a | n/a | `unknown` |",
        "| `nf_lr` |  |  | n/a | n/a | 1.0512 / 1.0498 bits/dim | 10.0 min (cuda) | `1234567` |",
    ]


def test_the_table_command_also_writes_the_ablation_table(tmp_path, monkeypatch):
    results = tmp_path / "results"
    write_metrics(results, "vae", {"negative_elbo": 97.0})
    (results / "reference.json").write_text(json.dumps(
        {"fingerprint": evaluation.reference_fingerprint(), "classifier_test_accuracy": 0.99, "rows": []}))
    cli.main(["--table", "--results", str(results), "--device", "cpu"])
    ablations = (results / "ablations.md").read_text().splitlines()
    assert ablations[0] == "# Ablations and seed studies" and ablations[-1].startswith("|---|")
    assert (results / "comparison.md").exists()
