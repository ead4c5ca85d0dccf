"""The VAE's math against known answers, its schedules and training loop, and its command line end
to end on a small fake MNIST folder."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import (
    REPO,
    assert_rebuild_reproduces_the_run,
    assert_refused_in_one_line,
    assert_resume_keeps_the_run,
    corrupt,
    needs_amx,
    record_precision,
)
from scipy import integrate
from scipy.special import logsumexp

import a3_vae_template as vae
import harness
from datasets.loader import TensorLoader
from harness.run import resolve_precision


def tiny_vae(z_dim=2, hidden_dim=8, seed=0, hidden_layers=2):
    torch.manual_seed(seed)
    return vae.VAE(hidden_dim=hidden_dim, z_dim=z_dim, hidden_layers=hidden_layers).eval()


def binary_images(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Pixel-dependent rates give the fake digits some structure for a model to learn.
    rates = torch.linspace(0.05, 0.6, vae.N_PIXELS).expand(n, -1)
    return torch.bernoulli(rates, generator=generator).reshape(n, 1, 28, 28)


def linear_shapes(net):
    return [(layer.in_features, layer.out_features) for layer in net if isinstance(layer, torch.nn.Linear)]


def quadrature_log_likelihood(model, x):
    """log p(x) of a z_dim = 1 VAE: the integral of p(x|z) p(z) over z in [-8, 8] as a Riemann sum,
    dz = 0.002, which for one variable is exact to far below the tests' tolerances."""
    z = torch.linspace(-8, 8, 8001)[:, None]
    with torch.no_grad():
        log_px_given_z = -vae.reconstruction_loss(model.decoder.logits(z)[:, None], x.reshape(len(x), -1))
    log_prior = -0.5 * z.double() ** 2 - 0.5 * math.log(2 * math.pi)
    log_joint = log_px_given_z.double().numpy() + log_prior.numpy()
    return logsumexp(log_joint, axis=0) + math.log(16 / 8000)


# ---------------------------------------------------------------- settings and model

@pytest.mark.parametrize("settings", [vae.DEFAULT, vae.TEMPLATE], ids=["default", "template"])
def test_encoder_and_decoder_have_the_settings_hidden_layers(settings):
    model = vae.VAE.from_settings(settings)
    hidden = [(500, 500)] * (settings.hidden_layers - 1)
    assert linear_shapes(model.encoder.net) == [(784, 500), *hidden, (500, 40)]
    assert linear_shapes(model.decoder.net) == [(20, 500), *hidden, (500, 784)]
    assert sum(isinstance(layer, torch.nn.ReLU) for layer in model.decoder.net) == settings.hidden_layers


def test_template_settings_are_the_course_templates():
    assert harness.settings.differences(vae.TEMPLATE, vae.DEFAULT) == {
        "hidden_layers": 1, "dynamic_binarization": False, "kl_warmup_epochs": 0, "cosine_decay": False}
    template = vae.TEMPLATE
    assert (template.epochs, template.z_dim, template.hidden_dim, template.batch_size, template.lr) == \
        (40, 20, 500, 128, 1e-3)


def test_sample_shapes_and_ranges():
    model = tiny_vae(z_dim=4)
    sampled_ims, im_means = model.sample(9)
    assert sampled_ims.shape == im_means.shape == (9, vae.N_PIXELS)
    assert set(sampled_ims.unique().tolist()) <= {0.0, 1.0}
    assert ((im_means > 0) & (im_means < 1)).all()
    mean, std = model.encoder(binary_images(5))
    assert mean.shape == std.shape == (5, 4) and (std > 0).all()


# ---------------------------------------------------------------- loss and likelihood estimates

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


def test_posterior_draws_reparameterised_samples_with_their_log_density_ratio():
    """The seam's three outputs for the Gaussian: z = mean + std * eps, log q(z|x) - log p(z) as
    torch.distributions computes it, and the closed-form KL."""
    model = tiny_vae(z_dim=3, hidden_dim=16)
    x = binary_images(4).reshape(4, -1)
    z, log_q_over_p, kl = model.posterior(x, 5, torch.Generator().manual_seed(1))
    with torch.no_grad():
        mean, std = model.encoder(x)
    eps = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z, mean + std * eps)
    q, p = torch.distributions.Normal(mean, std), torch.distributions.Normal(0.0, 1.0)
    torch.testing.assert_close(log_q_over_p, (q.log_prob(z) - p.log_prob(z)).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, vae.kl_to_standard_normal(mean, std))


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
        model.decoder.net[-1].bias.copy_(torch.linspace(-3, 3, vae.N_PIXELS))
    return model


def test_importance_sampling_is_exact_when_q_is_the_posterior():
    model = degenerate_vae()
    x = binary_images(6)
    probabilities = torch.sigmoid(torch.linspace(-3, 3, vae.N_PIXELS)).double()
    flat = x.reshape(6, -1).double()
    exact = -(flat * probabilities.log() + (1 - flat) * (-probabilities).log1p()).sum(1).mean().item()
    negative_elbo, nll = vae.importance_bounds(model, TensorLoader(x, batch_size=4), n_samples=7)
    assert nll == pytest.approx(exact, rel=1e-5)
    assert negative_elbo == pytest.approx(exact, rel=1e-5)


def test_importance_sampling_matches_quadrature_and_beats_the_elbo():
    # z_dim = 1: log p(x) = log of an integral over one variable, which quadrature gets exactly.
    model = tiny_vae(z_dim=1, hidden_dim=16, seed=3)
    with torch.no_grad():
        model.decoder.net[-1].weight.mul_(8)  # make p(x|z) depend strongly on z
    x = binary_images(4, seed=1)
    log_likelihood = quadrature_log_likelihood(model, x)

    noise = torch.Generator().manual_seed(0)
    negative_elbo, nll = vae.importance_bounds(model, TensorLoader(x, batch_size=4), 5000, noise)
    assert nll == pytest.approx(-log_likelihood.mean(), abs=0.1)
    assert negative_elbo > nll + 0.5  # a random encoder leaves a real gap

    # Each image's naive estimate at S samples from the prior converges to the same value.
    naive = vae.naive_mc_study(model, x, [5000], repeats=2, generator=noise)["rows"][0]
    np.testing.assert_allclose(naive["naive_mean"], log_likelihood, atol=0.15)
    np.testing.assert_allclose(naive["importance_mean"], log_likelihood, atol=0.15)


def test_importance_bounds_decode_in_chunks_without_changing_the_estimate(monkeypatch):
    """K samples drawn in several chunks (ROWS_PER_DECODER_CALL) give the estimate of one chunk."""
    model = tiny_vae(z_dim=2, hidden_dim=16, seed=4)
    data = TensorLoader(binary_images(8, seed=2), batch_size=8)
    whole = vae.importance_bounds(model, data, 12, torch.Generator().manual_seed(0))
    monkeypatch.setattr(vae, "ROWS_PER_DECODER_CALL", 8 * 5)  # chunks of 5, 5 and 2 samples
    chunked = vae.importance_bounds(model, data, 12, torch.Generator().manual_seed(0))
    assert chunked == pytest.approx(whole, rel=1e-6)


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
    assert loss.item() == pytest.approx(200.0 * vae.N_PIXELS, rel=0.01)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------- schedules

def old_lr(epoch, epochs, cosine_decay, lr=1e-3):
    """The learning rate as it was set once per epoch (counted from 1) before the step-wise schedule."""
    return lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs)) if cosine_decay else lr


def old_betas(epoch, warmup_epochs, n_batches):
    """The KL weights of an epoch's batches as they were computed once per epoch (counted from 1)."""
    ends = (1.0, 1.0) if warmup_epochs == 0 else \
        (min(1.0, (epoch - 1) / warmup_epochs), min(1.0, epoch / warmup_epochs))
    return torch.linspace(*ends, n_batches + 1)[1:].tolist()


@pytest.mark.parametrize("settings", [vae.DEFAULT, vae.TEMPLATE, dataclasses.replace(vae.DEFAULT, epochs=7)],
                         ids=["default", "template", "7 epochs"])
def test_learning_rate_at_every_step_is_the_per_epoch_value(settings):
    steps_per_epoch = 5
    for step in range(settings.epochs * steps_per_epoch):
        expected = old_lr(step // steps_per_epoch + 1, settings.epochs, settings.cosine_decay)
        assert vae.get_lr(step, steps_per_epoch, settings) == expected  # exactly


def test_learning_rate_is_a_half_cosine_from_the_first_epoch_or_constant():
    lr, settings = vae.DEFAULT.lr, vae.DEFAULT
    assert vae.get_lr(0, 10, settings) == vae.get_lr(9, 10, settings) == lr
    assert vae.get_lr(20 * 10, 10, settings) == pytest.approx(lr / 2)
    rates = [vae.get_lr(epoch * 10, 10, settings) for epoch in range(40)]
    assert all(a > b > 0 for a, b in zip(rates, rates[1:], strict=False))
    assert {vae.get_lr(step, 10, vae.TEMPLATE) for step in range(400)} == {lr}


@pytest.mark.parametrize("warmup", [5, 4, 2.5, 0])
def test_kl_weight_at_every_step_is_the_per_batch_linspace(warmup):
    settings = dataclasses.replace(vae.DEFAULT, kl_warmup_epochs=warmup)
    steps_per_epoch = 7
    for epoch in range(1, 8):
        expected = old_betas(epoch, warmup, steps_per_epoch)
        first = (epoch - 1) * steps_per_epoch
        betas = [vae.kl_weight(first + b, steps_per_epoch, settings) for b in range(steps_per_epoch)]
        assert betas == expected  # exactly


def test_kl_warm_up_rises_linearly_then_stays_at_one():
    settings = dataclasses.replace(vae.DEFAULT, kl_warmup_epochs=4)
    assert [vae.kl_weight(step, 1, settings) for step in range(6)] == [0.25, 0.5, 0.75, 1, 1, 1]
    assert {vae.kl_weight(step, 3, vae.TEMPLATE) for step in range(30)} == {1.0}


# ---------------------------------------------------------------- epoch loop

def test_training_epoch_weights_the_kl_term_by_the_warm_up_and_returns_the_true_negative_elbo(monkeypatch):
    """Batch b of the second epoch trains on L_recon + beta_b L_reg, beta_b rising linearly from 0.4 to
    0.8 (warm-up over 2.5 epochs); the value returned is the mean of L_recon + L_reg (beta = 1)."""
    model = tiny_vae(z_dim=3, hidden_dim=16).train()
    with torch.no_grad():
        model.encoder.net[-1].weight.mul_(20)  # codes far from the prior: a KL term that matters
    batches = list(binary_images(12, seed=7).split(4))
    losses = []
    monkeypatch.setattr(harness, "check_finite", lambda loss, where: losses.append((loss.item(), where)))
    settings = dataclasses.replace(vae.DEFAULT, kl_warmup_epochs=2.5, lr=0.0)  # lr 0: the model stays
    torch.manual_seed(5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    value = vae.epoch_iter(model, batches, optimizer, settings, first_step=3)

    torch.manual_seed(5)  # the same reparameterisation noise, batch by batch
    expected, total = [], 0.0
    with torch.no_grad():
        for step, (beta, x) in enumerate(zip((0.4 + 0.4 / 3, 0.4 + 0.8 / 3, 0.8), batches, strict=True), 3):
            reconstruction, regularisation = model.loss_terms(x)
            assert regularisation.mean() > 5
            expected.append(((reconstruction + beta * regularisation).mean().item(), f"training step {step}"))
            total += (reconstruction + regularisation).sum().item()
    assert [loss for loss, _ in losses] == pytest.approx([loss for loss, _ in expected], rel=1e-6)
    assert [where for _, where in losses] == [where for _, where in expected]
    assert value == pytest.approx(total / 12, rel=1e-6)


def test_training_epoch_sets_the_schedules_lr_before_every_step(monkeypatch):
    model = tiny_vae(z_dim=3, hidden_dim=16).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=123.0)
    rates = []
    monkeypatch.setattr(harness, "check_finite",
                        lambda loss, where: rates.append(optimizer.param_groups[0]["lr"]))
    settings = dataclasses.replace(vae.DEFAULT, epochs=4)
    batches = list(binary_images(6).split(2))
    vae.epoch_iter(model, batches, optimizer, settings, first_step=3)  # the second of 4 epochs
    assert rates == [vae.get_lr(step, 3, settings) for step in (3, 4, 5)] == [old_lr(2, 4, True)] * 3


def test_evaluation_epoch_takes_no_gradients_and_averages_over_images():
    model = tiny_vae(z_dim=3, hidden_dim=16)
    images = binary_images(10, seed=3)
    torch.manual_seed(0)
    value = vae.epoch_iter(model, TensorLoader(images, batch_size=4), None)  # batches of 4, 4, 2
    torch.manual_seed(0)
    with torch.no_grad():
        expected = torch.cat([sum(model.loss_terms(x)) for x in images.split(4)]).mean().item()
    assert value == pytest.approx(expected, rel=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_a_nan_loss_stops_training_before_the_step():
    model = tiny_vae().train()
    with torch.no_grad():
        model.decoder.net[-1].bias[0] = math.nan
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(harness.RunError, match="loss became nan at training step 0"):
        vae.epoch_iter(model, [binary_images(4)], torch.optim.SGD(model.parameters(), lr=0.1))
    for p, old in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p, old, rtol=0, atol=0, equal_nan=True)


def test_run_epoch_trains_in_the_given_precision_and_validates_in_fp32():
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    model = tiny_vae(z_dim=3, hidden_dim=16)
    seen = []
    record_precision(model.encoder.net[0], seen)
    train, val = TensorLoader(binary_images(8), batch_size=4), TensorLoader(binary_images(4, 1), batch_size=4)
    train_elbo, val_elbo = vae.run_epoch(model, (train, val), torch.optim.SGD(model.parameters(), lr=0.01),
                                         precision="bf16")
    assert seen == [(True, "bf16"), (True, "bf16"), (False, "ieee")]
    assert torch.backends.mkldnn.matmul.fp32_precision == "ieee" and not model.training
    assert np.isfinite([train_elbo, val_elbo]).all()


@needs_amx
def test_bf16_training_step_keeps_the_loss_and_gradient_of_fp32():
    """On a fixed seed and batch, the full-size model's loss and gradient under the bf16 training
    matmuls agree with fp32, and the loss itself is computed in fp32."""
    images = binary_images(32, seed=4)
    results = {}
    for precision in ("fp32", "bf16"):
        model = tiny_vae(z_dim=20, hidden_dim=vae.DEFAULT.hidden_dim, seed=1).train()
        with harness.matmul_precision(precision):
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


def test_fused_adam_trains_as_plain_adam():
    """The script's fused Adam is a speed-up only: three steps of epoch_iter give the parameters and
    the loss of torch's plain Adam from the same seed."""
    batches = list(binary_images(96, seed=8).split(32))
    models, values = [], []
    for fused in (True, False):
        model = tiny_vae(z_dim=4, hidden_dim=64).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=vae.DEFAULT.lr, fused=fused)
        torch.manual_seed(1)
        values.append(vae.epoch_iter(model, batches, optimizer))
        models.append(model)
    for fused, plain in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(fused, plain, rtol=0, atol=1e-6)
    assert values[0] == pytest.approx(values[1], rel=1e-6)
    torch.manual_seed(0)
    untrained = vae.VAE(64, 4)
    assert (models[0].encoder.net[0].weight - untrained.encoder.net[0].weight).abs().max() > 1e-3


# ---------------------------------------------------------------- command line

@pytest.fixture
def smoke(fake_mnist, small_splits, monkeypatch):
    """The script on the fake MNIST folder with its real data, evaluation and classifier code, at
    small sizes: 100 evaluation samples, a naive Monte-Carlo study of 2 x (10, 100)."""
    monkeypatch.setattr(vae, "EVALUATION_SAMPLES", 100)
    monkeypatch.setattr(vae, "NAIVE_MC_SAMPLE_COUNTS", (10, 100))
    monkeypatch.setattr(vae, "NAIVE_MC_REPEATS", 2)
    return fake_mnist.root


def argv(root, out, *flags):
    """2 epochs of 3 steps (90 fake training images in batches of 32), z = 2."""
    return ["--epochs", "2", "--zdim", "2", "--importance_samples", "4", "--set", "test_importance_samples=3",
            "--set", "batch_size=32", "--device", "cpu", "--data_root", str(root), "--out", str(out), *flags]


def run_main(root, out, *flags):
    vae.main(argv(root, out, *flags))
    return json.loads((out / "metrics.json").read_text())


def test_smoke_run_writes_every_output_and_resuming_it_reproduces_the_numbers(smoke, capsys):
    out = smoke / "vae"
    metrics = run_main(smoke, out, "--resume")  # no checkpoint yet: a new run

    figures = ["negative_elbo", "negative_elbo_zoom", "manifold", "memorisation"] + [
        f"{kind}_epoch{epoch:03d}" for kind in ("samples", "means") for epoch in (0, 1, 2)]
    expected = {f"{stem}.{ext}" for stem in figures for ext in ("png", "pdf")}
    assert {p.name for p in out.iterdir()} == expected | {"checkpoint.pt", "weights.pt", "metrics.json",
                                                          "train.log"}
    assert set(metrics["figures"].values()) == set(figures)
    assert metrics["figures"]["samples_halfway"] == "samples_epoch001"
    assert metrics["figures"]["means_end"] == "means_epoch002"
    assert metrics["milestones"] == {"halfway": 1, "kl_warmup_end": 6}

    assert metrics["epochs_completed"] == 2
    assert metrics["settings"] == {**dataclasses.asdict(vae.DEFAULT), "epochs": 2, "z_dim": 2,
                                   "importance_samples": 4, "test_importance_samples": 3, "batch_size": 32}
    assert metrics["training_precision"] == resolve_precision("auto", torch.device("cpu"))
    assert metrics["data"] == {"binarized_mnist": "reproduction", "binarization_seed": 1234,
                               "dynamic_binarization": True}
    curves = metrics["curves"]
    assert set(curves) == {"train_negative_elbo", "val_negative_elbo", "wall_time_s"}
    assert all(len(values) == 3 for values in curves.values())  # epoch 0 (untrained), 1 and 2
    assert curves["wall_time_s"][0] == 0.0 < curves["wall_time_s"][1] < curves["wall_time_s"][2]
    assert curves["train_negative_elbo"][0] == pytest.approx(784 * math.log(2), rel=0.02)  # p = 1/2
    for split, k in (("validation", 4), ("test", 3)):
        assert metrics[split]["importance_samples"] == k
        # The same K log-weights: log-mean-exp >= mean, so the NLL estimate never exceeds the -ELBO.
        assert 0 < metrics[split]["nll_importance"] <= metrics[split]["negative_elbo"]
    naive = metrics["naive_mc"]
    assert (naive["images"], naive["repeats"]) == (5, 2)
    assert [row["samples"] for row in naive["rows"]] == [10, 100]
    assert all(len(row[key]) == 5 for row in naive["rows"] for key in row if key != "samples")
    assert metrics["evaluation"]["reference"] == "test" and metrics["evaluation"]["n_samples"] == 100
    assert metrics["evaluation_binary"]["n_samples"] == 100  # binary samples, beside their means
    assert metrics["evaluation_binary"]["fid"] != metrics["evaluation"]["fid"]
    assert metrics["n_params"] == sum(p.numel() for p in vae.VAE(500, 2, 2).parameters())

    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    group = saved["state"]["optimizer"]["param_groups"][0]
    settings = vae.Settings(**metrics["settings"])
    assert group["fused"] and group["lr"] == vae.get_lr(5, 3, settings) == old_lr(2, 2, True)
    assert sorted(saved["extra"]["samples"]) == [0, 1, 2]
    images = vae.load_sampler(out / "checkpoint.pt")(6)
    assert images.shape == (6, vae.N_PIXELS) and images.min() >= 0 and images.max() <= 1

    # --resume of the finished run trains nothing and rewrites the same numbers.
    assert_resume_keeps_the_run(lambda: run_main(smoke, out, "--resume"), out, metrics, capsys)

    # Resuming with other settings is refused, in one line that names the setting.
    assert_refused_in_one_line(lambda: vae.main(argv(smoke, out, "--resume", "--zdim", "3")),
                               "z_dim=2 (asked: 3)")

    # From the weights alone: every figure again, the same numbers (the bounds kept from the run).
    for figure in expected:
        (out / figure).unlink()
    assert_rebuild_reproduces_the_run(lambda: run_main(smoke, out, "--from_weights"), out, metrics)
    assert {p.name for p in out.iterdir()} == expected | {"weights.pt", "metrics.json", "train.log"}


def test_template_flag_trains_the_templates_model_the_templates_way(smoke, monkeypatch):
    calls = {"bmnist": [], "kl_weight": []}
    bmnist, kl_weight = vae.bmnist, vae.kl_weight
    monkeypatch.setattr(vae, "bmnist", lambda *args, **kwargs: calls["bmnist"].append(kwargs)
                        or bmnist(*args, **kwargs))
    monkeypatch.setattr(vae, "kl_weight", lambda *args: calls["kl_weight"].append(kl_weight(*args))
                        or calls["kl_weight"][-1])
    out = smoke / "template"
    metrics = run_main(smoke, out, "--template")

    assert [kwargs["dynamic"] for kwargs in calls["bmnist"]] == [False]
    assert calls["kl_weight"] == [1.0] * 6  # no warm-up: beta = 1 at each of the 2 x 3 steps
    assert metrics["settings"] == {**dataclasses.asdict(vae.TEMPLATE), "epochs": 2, "z_dim": 2,
                                   "importance_samples": 4, "test_importance_samples": 3, "batch_size": 32}
    assert metrics["milestones"] == {"halfway": 1, "kl_warmup_end": 1}
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    weights = [name for name in saved["state"]["model"] if name.endswith("weight")]
    assert weights == ["encoder.net.0.weight", "encoder.net.2.weight", "decoder.net.0.weight",
                       "decoder.net.2.weight"]  # one hidden layer each
    assert saved["state"]["optimizer"]["param_groups"][0]["lr"] == vae.TEMPLATE.lr  # no decay
    assert metrics["n_params"] == sum(p.numel() for p in vae.VAE(500, 2, 1).parameters())
    assert vae.load_sampler(out / "checkpoint.pt")(3).shape == (3, 784)


def test_set_overrides_reach_the_model_and_the_record(smoke):
    out = smoke / "set"
    metrics = run_main(smoke, out, "--set", "hidden_dim=24", "--set", "hidden_layers=3", "--set", "lr=2e-3",
                       "--set", "cosine_decay=false", "--zdim", "3", "--set", "z_dim=4")
    assert metrics["settings"]["hidden_dim"] == 24 and metrics["settings"]["lr"] == 2e-3
    assert metrics["settings"]["z_dim"] == 4  # --set comes after the template's flag it overrides
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    shapes = [tuple(value.shape) for name, value in saved["state"]["model"].items()
              if name.endswith("weight")]
    assert shapes == [(24, 784), (24, 24), (24, 24), (8, 24), (24, 4), (24, 24), (24, 24), (784, 24)]
    assert saved["state"]["optimizer"]["param_groups"][0]["lr"] == 2e-3
    assert metrics["n_params"] == sum(p.numel() for p in vae.VAE(24, 4, 3).parameters())


def test_resume_after_a_nan_matches_an_uninterrupted_run(smoke, monkeypatch):
    uninterrupted = run_main(smoke, smoke / "straight")
    out = smoke / "resumed"
    kl_weight = vae.kl_weight
    with monkeypatch.context() as patch, pytest.raises(harness.RunError, match="loss became nan"):
        patch.setattr(vae, "kl_weight", lambda step, steps_per_epoch, settings: math.nan
                      if step // steps_per_epoch == 1 else kl_weight(step, steps_per_epoch, settings))
        run_main(smoke, out)
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert saved["epoch"] == 1  # the failed epoch left the last good checkpoint alone
    assert saved["curves"]["val_negative_elbo"] == uninterrupted["curves"]["val_negative_elbo"][:2]
    assert not (out / "metrics.json").exists()

    resumed = run_main(smoke, out, "--resume")
    for name in ("train_negative_elbo", "val_negative_elbo"):
        assert resumed["curves"][name] == uninterrupted["curves"][name]  # RNG states come back too
    for key in ("validation", "test", "naive_mc", "evaluation"):
        assert resumed[key] == uninterrupted[key]
    assert "resumed from" in (out / "train.log").read_text()


def test_a_corrupted_mnist_file_ends_in_one_line(smoke):
    path = corrupt(smoke)
    assert_refused_in_one_line(lambda: vae.main(argv(smoke, smoke / "out")), str(path),
                               "corrupted or truncated")


@pytest.mark.parametrize("setting, fragments", [("nonsense=1", ("no setting 'nonsense'", "z_dim")),
                                                ("z_dim=two", ("z_dim is an int",)),
                                                ("z_dim=0", ("z_dim must be positive",))])
def test_bad_settings_end_in_one_line(smoke, setting, fragments):
    assert_refused_in_one_line(lambda: vae.main(argv(smoke, smoke / "out", "--set", setting)), *fragments)


def test_a_corrupted_mnist_file_on_the_real_command_line_prints_no_traceback(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(b"<html>404 Not Found</html>")
    result = subprocess.run([sys.executable, "a3_vae_template.py", "--data_root", str(tmp_path),
                             "--out", str(tmp_path / "out"), "--device", "cpu"], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "train-images-idx3-ubyte" in lines[0]
    assert "is corrupted or truncated" in lines[0]


@pytest.mark.parametrize("flag, value", [("--epochs", "-1"), ("--zdim", "0"), ("--importance_samples", "0")])
def test_bad_values_are_argparse_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        vae.parse_args([flag, value])
    assert exit_info.value.code == 2
    assert f"{flag}: must be a positive integer" in capsys.readouterr().err


def test_defaults_template_flags_and_removed_flags():
    args = vae.parse_args([])
    assert args.out == "results/vae"
    assert harness.settings.resolve(args, vae.DEFAULT, vae.TEMPLATE) == vae.DEFAULT
    args = vae.parse_args(["--template", "--epochs", "3", "--zdim", "2", "--importance_samples", "7"])
    assert harness.settings.resolve(args, vae.DEFAULT, vae.TEMPLATE) == dataclasses.replace(
        vae.TEMPLATE, epochs=3, z_dim=2, importance_samples=7)
    for removed in ("--hidden-dim", "--lr", "--batch-size", "--warmup-epochs", "--posterior", "--flow_steps",
                    "--iw_samples"):
        with pytest.raises(SystemExit):
            vae.parse_args([removed, "1"])
