"""The VAE's math against known answers, and its command line end to end on small fake data."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.special import logsumexp

import a3_vae_template as vae
import common
from datasets.loader import TensorLoader

ROOT = Path(__file__).resolve().parent.parent


def tiny_vae(z_dim=2, hidden_dim=8, seed=0):
    torch.manual_seed(seed)
    return vae.VAE(hidden_dim=hidden_dim, z_dim=z_dim).eval()


def binary_images(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Pixel-dependent rates give the fake digits some structure for the smoke run to learn.
    rates = torch.linspace(0.05, 0.6, vae.IMAGE_DIM).expand(n, -1)
    return torch.bernoulli(rates, generator=generator).reshape(n, 1, 28, 28)


def test_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    mean = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.3, -0.7]])
    std = torch.tensor([[0.5, 1.5, 0.8], [1.0, 0.2, 2.0]])
    closed_form = vae.kl_to_standard_normal(mean, std)
    q = torch.distributions.Normal(mean, std)
    p = torch.distributions.Normal(0.0, 1.0)
    z = q.sample((100_000,))
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    torch.testing.assert_close(closed_form, monte_carlo, rtol=0.01, atol=0.0)
    exact = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, torch.ones(3))).sum(-1)
    torch.testing.assert_close(closed_form, exact)


def test_negative_elbo_matches_brute_force():
    model = tiny_vae(z_dim=2, hidden_dim=5)
    x = binary_images(3).reshape(3, -1)
    torch.manual_seed(123)
    value = model(x)

    # The same noise the forward pass drew, then every term by hand in float64.
    torch.manual_seed(123)
    eps = torch.randn(3, 2).double()
    with torch.no_grad():
        mean, std = (t.double() for t in model.encoder(x))
        probabilities = model.decoder((mean + std * eps).float()).double().numpy()
    xs = x.double().numpy()
    log_likelihood = (xs * np.log(probabilities) + (1 - xs) * np.log1p(-probabilities)).sum(1)

    def kl_1d(m, s):  # KL(N(m, s^2) || N(0, 1)) by numerical integration
        def integrand(z):
            log_q = -0.5 * ((z - m) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)
            log_p = -0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)
            return math.exp(log_q) * (log_q - log_p)
        return integrate.quad(integrand, m - 30 * s, m + 30 * s, epsabs=1e-12)[0]

    kl = np.array([sum(kl_1d(m, s) for m, s in zip(mean[i].tolist(), std[i].tolist(), strict=True))
                   for i in range(3)])
    expected = np.mean(-log_likelihood + kl)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def degenerate_vae():
    """q(z|x) = p(z) = N(0, I) and p(x|z) independent of z: log p(x) is known exactly."""
    model = tiny_vae(z_dim=3)
    with torch.no_grad():
        for layer in (model.encoder.net[-1], model.decoder.net[-1]):
            layer.weight.zero_()
        model.encoder.net[-1].bias.zero_()
        model.decoder.net[-1].bias.copy_(torch.linspace(-3, 3, vae.IMAGE_DIM))
    return model


def test_importance_sampling_is_exact_when_q_is_the_posterior():
    model = degenerate_vae()
    x = binary_images(6)
    probabilities = torch.sigmoid(torch.linspace(-3, 3, vae.IMAGE_DIM)).double()
    flat = x.reshape(6, -1).double()
    exact = -(flat * probabilities.log() + (1 - flat) * (-probabilities).log1p()).sum(1).mean().item()
    negative_elbo, nll = vae.test_bounds(model, TensorLoader(x, batch_size=4), n_samples=7)
    assert nll == pytest.approx(exact, rel=1e-5)
    assert negative_elbo == pytest.approx(exact, rel=1e-5)


def test_importance_sampling_matches_quadrature_and_beats_the_elbo():
    # z_dim = 1: log p(x) = log of an integral over one variable, which quadrature gets exactly.
    model = tiny_vae(z_dim=1, hidden_dim=16, seed=3)
    with torch.no_grad():
        model.decoder.net[-1].weight.mul_(8)  # make p(x|z) depend strongly on z
    x = binary_images(4, seed=1)
    z = torch.linspace(-8, 8, 8001)[:, None]
    with torch.no_grad():
        log_px_given_z = -vae.reconstruction_loss(model.decoder.logits(z)[:, None], x.reshape(4, -1))
    log_prior = -0.5 * z.double() ** 2 - 0.5 * math.log(2 * math.pi)
    log_joint = log_px_given_z.double().numpy() + log_prior.numpy()
    log_likelihood = logsumexp(log_joint, axis=0) + math.log(16 / 8000)  # Riemann sum, dz = 0.002

    noise = torch.Generator().manual_seed(0)
    negative_elbo, nll = vae.test_bounds(model, TensorLoader(x, batch_size=4), 5000, noise)
    assert nll == pytest.approx(-log_likelihood.mean(), abs=0.1)
    assert negative_elbo > nll + 0.5  # a random encoder leaves a real gap

    # Each image's naive estimate at S samples from the prior converges to the same value.
    naive = vae.naive_mc_study(model, x, [5000], repeats=2, generator=noise)["rows"][0]
    np.testing.assert_allclose(naive["naive_mean"], log_likelihood, atol=0.15)
    np.testing.assert_allclose(naive["importance_mean"], log_likelihood, atol=0.15)


def test_gradients_reach_the_encoder_through_the_sample():
    model = tiny_vae().train()
    reconstruction, _ = model.loss_terms(binary_images(4))
    reconstruction.mean().backward()  # the KL term alone would also reach the encoder: leave it out
    for name, parameter in model.encoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("pixel", [0.0, 1.0])
def test_constant_images_give_finite_loss_even_with_saturated_decoder(pixel):
    model = tiny_vae().train()
    with torch.no_grad():
        model.decoder.net[-1].bias.fill_(-200.0 if pixel else 200.0)  # sigmoid rounds to exactly 1 or 0
    loss = model(torch.full((4, 1, 28, 28), pixel))
    loss.backward()
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(200.0 * vae.IMAGE_DIM, rel=0.01)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_sample_shapes_and_ranges():
    model = tiny_vae(z_dim=4)
    sampled_ims, im_means = model.sample(9)
    assert sampled_ims.shape == im_means.shape == (9, vae.IMAGE_DIM)
    assert set(sampled_ims.unique().tolist()) <= {0.0, 1.0}
    assert ((im_means > 0) & (im_means < 1)).all()
    mean, std = model.encoder(binary_images(5))
    assert mean.shape == std.shape == (5, 4) and (std > 0).all()


def test_kl_warm_up_rises_linearly_then_stays_at_one():
    assert [vae.kl_weights(epoch, 4) for epoch in (1, 2, 4, 5)] == [(0, 0.25), (0.25, 0.5), (0.75, 1), (1, 1)]
    assert vae.kl_weights(1, 0) == (1, 1)


def test_bf16_training_step_keeps_the_loss_and_gradient_of_fp32():
    """The speed-up must not change results: on a fixed seed and batch, the full-size model's loss and
    gradient under bf16 matmuls agree with fp32, and the loss itself is computed in fp32."""
    images = binary_images(32, seed=4)
    results = {}
    for precision in ("fp32", "bf16"):
        model = tiny_vae(z_dim=20, hidden_dim=500, seed=1).train()
        with common.autocast(precision, torch.device("cpu")):
            torch.manual_seed(2)
            reconstruction, regularisation = model.loss_terms(images)
        assert reconstruction.dtype == regularisation.dtype == torch.float32
        loss = (reconstruction + regularisation).mean()
        loss.backward()
        results[precision] = loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])
    (loss_fp32, grad_fp32), (loss_bf16, grad_bf16) = results["fp32"], results["bf16"]
    assert loss_bf16 == pytest.approx(loss_fp32, abs=0.05)
    assert torch.cosine_similarity(grad_bf16, grad_fp32, dim=0) > 0.999
    assert (grad_bf16.norm() / grad_fp32.norm()).item() == pytest.approx(1, abs=0.01)


def test_bf16_epoch_trains_on_the_updated_weights_at_every_step():
    """Two bf16 steps of epoch_iter equal two steps that each open their own autocast region: the
    second forward pass must see the weights of the first update, not autocast's cached copies."""
    images = binary_images(8, seed=6)
    stepped = tiny_vae(z_dim=4, hidden_dim=32, seed=2).train()
    optimizer = torch.optim.SGD(stepped.parameters(), lr=0.1)
    torch.manual_seed(3)
    vae.epoch_iter(stepped, TensorLoader(images, batch_size=4), optimizer, precision="bf16")

    reference = tiny_vae(z_dim=4, hidden_dim=32, seed=2).train()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    torch.manual_seed(3)
    for batch in images.split(4):
        with common.autocast("bf16", torch.device("cpu")):
            loss = reference(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for trained, expected in zip(stepped.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(trained, expected)


def test_evaluation_ignores_the_training_precision():
    model = tiny_vae(z_dim=4, hidden_dim=16)
    loader = TensorLoader(binary_images(6, seed=5), batch_size=3)
    torch.manual_seed(0)
    fp32 = vae.epoch_iter(model, loader, None)
    torch.manual_seed(0)
    assert vae.epoch_iter(model, loader, None, precision="bf16") == fp32


def fake_bmnist(root, batch_size, download=True, *, dynamic=False, **_):
    assert Path(root).is_dir() and dynamic
    return (TensorLoader(binary_images(64, seed=1), batch_size=batch_size, shuffle=True),
            TensorLoader(binary_images(32, seed=2), batch_size=batch_size),
            TensorLoader(binary_images(24, seed=3), batch_size=batch_size))


def test_cli_smoke_run_writes_every_output_and_resumes(tmp_path, monkeypatch):
    evaluated = []

    def evaluate_samples(images, root, device):
        evaluated.append(images)
        return {"fid": 1.0}

    monkeypatch.setattr(vae, "bmnist", fake_bmnist)
    monkeypatch.setattr(vae, "evaluation", SimpleNamespace(evaluate_samples=evaluate_samples))
    monkeypatch.setattr(vae, "NAIVE_MC_SAMPLE_COUNTS", (10, 100))
    monkeypatch.setattr(vae, "EVALUATION_SAMPLES", 50)
    out = tmp_path / "out"
    argv = ["--epochs", "2", "--zdim", "2", "--hidden-dim", "16", "--batch-size", "16",
            "--importance-samples", "8", "--device", "cpu", "--data-root", str(tmp_path), "--out", str(out)]
    vae.main(argv)

    figures = ["negative_elbo", "negative_elbo_zoom", "manifold"] + [
        f"{kind}_epoch{epoch:03d}" for kind in ("samples", "means") for epoch in (0, 1, 2)]
    expected = {f"{stem}.{ext}" for stem in figures for ext in ("png", "pdf")}
    expected |= {"checkpoint.pt", "metrics.json", "train.log"}
    assert {p.name for p in out.iterdir()} == expected

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 2
    curves = metrics["curves"]
    assert len(curves["train_negative_elbo"]) == len(curves["val_negative_elbo"]) == 3
    assert curves["wall_time_s"][0] == 0.0 and curves["wall_time_s"][2] > curves["wall_time_s"][1] > 0
    assert curves["val_negative_elbo"][2] < curves["val_negative_elbo"][0]
    test = metrics["test"]
    assert test["importance_samples"] == 8
    assert 0 < test["nll_importance"] <= test["negative_elbo"]
    assert [row["samples"] for row in metrics["naive_mc"]["rows"]] == [10, 100]
    assert len(metrics["naive_mc"]["rows"][0]["naive_std"]) == 5
    assert metrics["evaluation"] == {"fid": 1.0}
    assert evaluated[0].shape == (50, vae.IMAGE_DIM)
    assert metrics["n_params"] == sum(p.numel() for p in vae.VAE(16, 2).parameters())
    for key in ("args", "command", "git_commit", "device", "torch", "threads", "started", "images_per_s"):
        assert key in metrics

    sample = vae.load_sampler(out / "checkpoint.pt", "cpu")
    images = sample(6)
    assert images.shape == (6, vae.IMAGE_DIM) and images.device.type == "cpu"
    assert images.min() >= 0 and images.max() <= 1

    # Resuming a finished run trains nothing and rewrites the same numbers.
    (out / "metrics.json").unlink()
    vae.main(argv + ["--resume"])
    again = json.loads((out / "metrics.json").read_text())
    assert again["curves"] == curves and again["test"] == test


def test_resume_after_a_nan_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.setattr(vae, "bmnist", fake_bmnist)
    monkeypatch.setattr(vae, "evaluation", None)
    monkeypatch.setattr(vae, "NAIVE_MC_SAMPLE_COUNTS", (10,))

    def run(out, *flags):
        vae.main(["--zdim", "3", "--hidden-dim", "8", "--batch-size", "16", "--importance-samples", "4",
                  "--device", "cpu", "--data-root", str(tmp_path), "--out", str(tmp_path / out), *flags])
        return json.loads((tmp_path / out / "metrics.json").read_text())["curves"]

    uninterrupted = run("straight", "--epochs", "2")
    after_one = run("resumed", "--epochs", "1")
    with monkeypatch.context() as patch, pytest.raises(SystemExit, match="loss became nan"):
        patch.setattr(vae, "kl_to_standard_normal", lambda mean, std: mean.sum(-1) * math.nan)
        run("resumed", "--epochs", "2", "--resume")
    saved = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert saved["curves"] == after_one  # the failed epoch left the last good checkpoint alone

    resumed = run("resumed", "--epochs", "2", "--resume")
    for name in ("train_negative_elbo", "val_negative_elbo"):
        assert resumed[name] == uninterrupted[name]  # RNG states come back with the checkpoint
    assert "resumed from" in (tmp_path / "resumed" / "train.log").read_text()


@pytest.mark.parametrize("flag, value", [("--epochs", "-1"), ("--zdim", "0")])
def test_bad_values_are_argparse_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        vae.parse_args([flag, value])
    assert exit_info.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err


def test_bad_value_on_the_real_command_line_prints_no_traceback():
    result = subprocess.run([sys.executable, "a3_vae_template.py", "--epochs", "-1"], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    assert "--epochs: must be a positive integer" in result.stderr
    assert "Traceback" not in result.stderr
