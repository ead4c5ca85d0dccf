"""The VAE's math against known answers, its training loop, and its command line end to end on a
small fake MNIST folder."""

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
    assert_one_line_error,
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
import common
from datasets.loader import TensorLoader


def tiny_vae(z_dim=2, hidden_dim=8, seed=0, hidden_layers=2):
    torch.manual_seed(seed)
    return vae.VAE(hidden_dim=hidden_dim, z_dim=z_dim, hidden_layers=hidden_layers).eval()


def binary_images(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Pixel-dependent rates give the fake digits some structure for a model to learn.
    rates = torch.linspace(0.05, 0.6, vae.IMAGE_DIM).expand(n, -1)
    return torch.bernoulli(rates, generator=generator).reshape(n, 1, 28, 28)


def linear_shapes(net):
    return [(layer.in_features, layer.out_features) for layer in net if isinstance(layer, torch.nn.Linear)]


# ---------------------------------------------------------------- model

@pytest.mark.parametrize("setting", [vae.OURS, vae.TEMPLATE], ids=["ours", "template"])
def test_encoder_and_decoder_have_the_settings_hidden_layers(setting):
    model = vae.VAE(vae.HIDDEN_DIM, 20, setting["hidden_layers"])
    hidden = [(500, 500)] * (setting["hidden_layers"] - 1)
    assert linear_shapes(model.encoder.net) == [(784, 500), *hidden, (500, 40)]
    assert linear_shapes(model.decoder.net) == [(20, 500), *hidden, (500, 784)]
    assert sum(isinstance(layer, torch.nn.ReLU) for layer in model.decoder.net) == setting["hidden_layers"]


def test_template_setting_is_the_course_template():
    assert vae.TEMPLATE == {"hidden_layers": 1, "dynamic_binarization": False, "warmup_epochs": 0,
                            "cosine_decay": False}
    assert (vae.HIDDEN_DIM, vae.BATCH_SIZE, vae.LEARNING_RATE) == (500, 128, 1e-3)


def test_sample_shapes_and_ranges():
    model = tiny_vae(z_dim=4)
    sampled_ims, im_means = model.sample(9)
    assert sampled_ims.shape == im_means.shape == (9, vae.IMAGE_DIM)
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
    assert loss.item() == pytest.approx(200.0 * vae.IMAGE_DIM, rel=0.01)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------- flow posteriors, importance-weighted bound

def flow_vae(posterior, z_dim=3, flow_steps=3, seed=0, hidden_dim=16):
    torch.manual_seed(seed)
    return vae.VAE(hidden_dim=hidden_dim, z_dim=z_dim, hidden_layers=1, posterior=posterior,
                   flow_steps=flow_steps).eval()


def flow_and_context(posterior, z_dim=3, steps=3, seed=0):
    """A float64 flow and a random context for one image (planar: amortised u, w, b)."""
    model = flow_vae(posterior, z_dim, steps, seed).double()
    context = torch.randn(1, model.flow.context_dim, generator=torch.Generator().manual_seed(seed),
                          dtype=torch.float64)
    return model.flow, context


@pytest.mark.parametrize("posterior", ["planar", "iaf"])
def test_flow_log_determinant_is_that_of_autograds_jacobian(posterior):
    flow, context = flow_and_context(posterior, z_dim=4, steps=3)
    for seed in range(3):
        z = torch.randn(1, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
        jacobian = torch.autograd.functional.jacobian(lambda z: flow(z, context)[0][0], z)[:, 0]
        _, log_det = flow(z, context)
        assert log_det.item() == pytest.approx(torch.linalg.slogdet(jacobian)[1].item(), abs=1e-10)
        assert abs(log_det.item()) > 1e-3  # not the identity: the check has something to check


def test_each_iaf_step_is_autoregressive_in_alternating_order():
    """Step 1 is lower triangular (z_i sees z_j, j < i), step 2 upper (the order reversed), and the
    diagonal is sigmoid(s)."""
    flow, context = flow_and_context("iaf", z_dim=4, steps=2)
    z = torch.randn(1, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for step, triangle in zip(flow.steps, (torch.tril, torch.triu), strict=True):
        jacobian = torch.autograd.functional.jacobian(lambda z, step=step: step(z, context)[0][0], z)[:, 0]
        torch.testing.assert_close(jacobian, triangle(jacobian))
        assert (torch.diagonal(jacobian) > 0).all() and (torch.diagonal(jacobian) < 1).all()
        assert (jacobian - torch.diagonal(jacobian).diag()).abs().sum() > 1e-3


def test_planar_constraint_makes_every_step_invertible():
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(10_000, 5, generator=generator, dtype=torch.float64) * 3
    w = torch.randn(10_000, 5, generator=generator, dtype=torch.float64) * 3
    assert ((w * u).sum(-1) < -1).float().mean() > 0.2  # many raw u break the condition
    u_hat, one_plus_wu_hat = vae.constrain_planar_u(u, w)
    wu_hat = (w * u_hat).sum(-1)
    assert (wu_hat >= -1 - 1e-12).all()  # = -1 + softplus(w^T u) > -1, up to the dot product's rounding
    assert (one_plus_wu_hat > 0).all()
    torch.testing.assert_close(1 + wu_hat, one_plus_wu_hat, rtol=0, atol=1e-12)
    # where the condition already held, u_hat moves only along w
    parallel = u_hat - u - ((u_hat - u) * w).sum(-1, keepdim=True) * w / w.square().sum(-1, keepdim=True)
    torch.testing.assert_close(parallel, torch.zeros_like(parallel))


def gaussian_reference(model, x, seed, scale=1.0):
    """L_recon and the sampled L_reg of the Gaussian posterior N(scale * mean, (scale * std)^2),
    by torch.distributions, from the noise that the seeded ``loss_terms`` draws."""
    torch.manual_seed(seed)
    with torch.no_grad():
        mean, std, _ = model.encoder.posterior_parameters(x)
        q = torch.distributions.Normal(scale * mean, scale * std)
        z = q.loc + q.scale * torch.randn(1, *mean.shape)[0]
        reconstruction = vae.reconstruction_loss(model.decoder.logits(z), x.reshape(len(x), -1))
        regularisation = (q.log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z)).sum(-1)
    return reconstruction, regularisation


@pytest.mark.parametrize("posterior, scale", [("planar", 1.0), ("iaf", 0.5 ** 3)])
def test_flow_with_zeroed_parameters_is_the_gaussian_posterior(posterior, scale):
    """Zero amortised planar parameters make every step the identity; a zeroed IAF output layer
    gives m = 0, s = 0, so each of the 3 steps halves z. Either way q(z_K|x) is a Gaussian whose
    one-sample objective, with the same noise, is known."""
    model = flow_vae(posterior)
    with torch.no_grad():
        if posterior == "planar":
            model.encoder.net[-1].weight[2 * model.z_dim:].zero_()
            model.encoder.net[-1].bias[2 * model.z_dim:].zero_()
        else:
            for step in model.flow.steps:
                step.output.weight.zero_()
                step.output.bias.zero_()
    x = binary_images(5).reshape(5, -1)
    torch.manual_seed(7)
    with torch.no_grad():
        reconstruction, regularisation = model.loss_terms(x)
    expected_reconstruction, expected_regularisation = gaussian_reference(model, x, 7, scale)
    torch.testing.assert_close(reconstruction, expected_reconstruction, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(regularisation, expected_regularisation, rtol=1e-6, atol=1e-5)


def test_importance_weighted_bound_with_one_sample_is_the_elbo_estimate():
    model = tiny_vae(z_dim=3, hidden_dim=16)
    x = binary_images(5).reshape(5, -1)
    torch.manual_seed(3)
    with torch.no_grad():
        bound, negative_elbo = vae.importance_weighted_loss(model, x, 1)
    reconstruction, regularisation = gaussian_reference(model, x, 3)
    torch.testing.assert_close(bound, reconstruction + regularisation)
    torch.testing.assert_close(negative_elbo, bound)
    # the KL warm-up's beta scales the log-weights' log p(z) - log q(z|x), as it scales L_reg
    torch.manual_seed(3)
    with torch.no_grad():
        warm, _ = vae.importance_weighted_loss(model, x, 1, kl_weight=0.25)
    torch.testing.assert_close(warm, reconstruction + 0.25 * regularisation)


def quadrature_log_likelihood(model, x):
    """log p(x) of a z_dim = 1 VAE: the integral of p(x|z) p(z) over z in [-8, 8] as a Riemann sum,
    dz = 0.002, which for one variable is exact to far below the tests' tolerances."""
    z = torch.linspace(-8, 8, 8001)[:, None]
    with torch.no_grad():
        log_px_given_z = -vae.reconstruction_loss(model.decoder.logits(z)[:, None], x.reshape(len(x), -1))
    log_prior = -0.5 * z.double() ** 2 - 0.5 * math.log(2 * math.pi)
    log_joint = log_px_given_z.double().numpy() + log_prior.numpy()
    return logsumexp(log_joint, axis=0) + math.log(16 / 8000)


def test_importance_weighted_bound_rises_with_k_towards_log_likelihood():
    """E[L_k] over many draws, on a z_dim = 1 VAE whose log p(x) quadrature gets exactly:
    non-decreasing in k (Burda et al., 2016, theorem 1), below log p(x), and close to it at k = 256."""
    model = tiny_vae(z_dim=1, hidden_dim=16, seed=3)
    with torch.no_grad():
        model.decoder.net[-1].weight.mul_(8)  # make p(x|z) depend strongly on z: a real gap
    x = binary_images(2, seed=1).reshape(2, -1)
    log_likelihood = quadrature_log_likelihood(model, x)
    repeats = 400
    torch.manual_seed(0)
    means, errors = [], []
    with torch.no_grad():
        for k in (1, 4, 16, 256):
            bounds = -vae.importance_weighted_loss(model, x.repeat(repeats, 1), k)[0].double()
            bounds = bounds.reshape(repeats, 2)
            means.append(bounds.mean(0).numpy())
            errors.append(bounds.std(0).numpy() / math.sqrt(repeats))
    for i in range(3):
        assert (means[i + 1] - means[i] > 3 * np.hypot(errors[i], errors[i + 1])).all(), means
    assert (means[-1] < log_likelihood + 3 * errors[-1]).all()
    np.testing.assert_allclose(means[-1], log_likelihood, atol=0.3)
    assert (log_likelihood - means[0] > 2).all()  # the ELBO's gap that the bound closes


@pytest.mark.parametrize("posterior", ["planar", "iaf"])
def test_importance_sampled_likelihood_with_a_flow_posterior_matches_quadrature(posterior):
    """With q(z_K|x) = q_0(z_0|x) / prod |det|, the NLL estimate is unbiased in p(x) whatever the
    flow: it must agree with quadrature, and the ELBO stay below it."""
    model = flow_vae(posterior, z_dim=1, flow_steps=4, seed=3)
    with torch.no_grad():
        model.decoder.net[-1].weight.mul_(8)
        if posterior == "planar":  # keep w away from 0, where u_hat (and the proposal) blows up
            model.encoder.net[-1].bias[2:].view(4, 3)[:, 1] += 1.5
    x = binary_images(4, seed=1)
    log_likelihood = quadrature_log_likelihood(model, x)
    negative_elbo, nll = vae.importance_bounds(model, TensorLoader(x, batch_size=4), 5000,
                                               torch.Generator().manual_seed(0))
    assert nll == pytest.approx(-log_likelihood.mean(), abs=0.1)
    assert negative_elbo > nll + 0.5


def test_training_on_the_importance_weighted_bound_returns_the_negative_elbo(monkeypatch):
    """With iw_samples = k > 1 each step is on -L_k, and the epoch's value is still the negative ELBO."""
    model = flow_vae("iaf", seed=2).train()
    batches = list(binary_images(8, seed=3).split(4))
    losses = []
    monkeypatch.setattr(common, "check_finite", lambda loss, where: losses.append(loss.item()))
    torch.manual_seed(5)
    value = vae.epoch_iter(model, batches, torch.optim.SGD(model.parameters(), lr=0.0), iw_samples=6)
    torch.manual_seed(5)
    with torch.no_grad():
        expected = [vae.importance_weighted_loss(model, x.reshape(4, -1), 6) for x in batches]
    assert losses == pytest.approx([bound.mean().item() for bound, _ in expected], rel=1e-6)
    assert value == pytest.approx(torch.cat([elbo for _, elbo in expected]).mean().item(), rel=1e-6)
    assert all(elbo.mean() > bound.mean() for bound, elbo in expected)


# ---------------------------------------------------------------- schedules

def test_kl_warm_up_rises_linearly_then_stays_at_one():
    assert [vae.kl_weights(epoch, 4) for epoch in (1, 2, 4, 5)] == [(0, 0.25), (0.25, 0.5), (0.75, 1), (1, 1)]
    assert [vae.kl_weights(epoch, 0) for epoch in (1, 7)] == [(1, 1), (1, 1)]


def test_learning_rate_is_a_half_cosine_from_the_first_epoch_or_constant():
    lr = vae.LEARNING_RATE
    assert vae.get_lr(1, 40, True) == lr
    assert vae.get_lr(21, 40, True) == pytest.approx(lr / 2)
    assert vae.get_lr(40, 40, True) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 39 / 40)))
    rates = [vae.get_lr(epoch, 40, True) for epoch in range(1, 41)]
    assert all(a > b > 0 for a, b in zip(rates, rates[1:], strict=False))
    assert vae.get_lr(2, 2, True) == pytest.approx(lr / 2)
    assert {vae.get_lr(epoch, 40, False) for epoch in range(1, 41)} == {lr}


# ---------------------------------------------------------------- epoch loop

def test_training_epoch_weights_the_kl_term_by_the_warm_up_and_returns_the_true_negative_elbo(monkeypatch):
    """Batch k of n trains on L_recon + beta_k L_reg, beta_k rising linearly to kl_weight[1] over the
    epoch; the value returned is the mean of L_recon + L_reg (beta = 1) over the images."""
    model = tiny_vae(z_dim=3, hidden_dim=16).train()
    with torch.no_grad():
        model.encoder.net[-1].weight.mul_(20)  # codes far from the prior: a KL term that matters
    batches = list(binary_images(12, seed=7).split(4))
    losses = []
    monkeypatch.setattr(common, "check_finite", lambda loss, where: losses.append((loss.item(), where)))
    torch.manual_seed(5)
    value = vae.epoch_iter(model, batches, torch.optim.SGD(model.parameters(), lr=0.0), kl_weight=(0.0, 0.6))

    torch.manual_seed(5)  # the same reparameterisation noise, batch by batch
    expected, total = [], 0.0
    with torch.no_grad():
        for step, (beta, x) in enumerate(zip((0.2, 0.4, 0.6), batches, strict=True)):
            reconstruction, regularisation = model.loss_terms(x)
            assert regularisation.mean() > 5
            loss = (reconstruction + beta * regularisation).mean().item()
            expected.append((loss, f"training batch {step}"))
            total += (reconstruction + regularisation).sum().item()
    assert [loss for loss, _ in losses] == pytest.approx([loss for loss, _ in expected], rel=1e-6)
    assert [where for _, where in losses] == [where for _, where in expected]
    assert value == pytest.approx(total / 12, rel=1e-6)


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
    with pytest.raises(common.RunError, match="loss became nan at training batch 0"):
        vae.epoch_iter(model, [binary_images(4)], torch.optim.SGD(model.parameters(), lr=0.1))
    for p, old in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p, old, rtol=0, atol=0, equal_nan=True)


def test_run_epoch_trains_in_the_runs_precision_and_validates_in_fp32(monkeypatch):
    monkeypatch.setattr(common, "_training_precision", "bf16")
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    model = tiny_vae(z_dim=3, hidden_dim=16)
    seen = []
    record_precision(model.encoder.net[0], seen)
    train, val = TensorLoader(binary_images(8), batch_size=4), TensorLoader(binary_images(4, 1), batch_size=4)
    train_elbo, val_elbo = vae.run_epoch(model, (train, val), torch.optim.SGD(model.parameters(), lr=0.01))
    assert seen == [(True, "bf16"), (True, "bf16"), (False, "ieee")]
    assert torch.backends.mkldnn.matmul.fp32_precision == "ieee" and not model.training
    assert np.isfinite([train_elbo, val_elbo]).all()


@needs_amx
def test_bf16_training_step_keeps_the_loss_and_gradient_of_fp32(monkeypatch):
    """On a fixed seed and batch, the full-size model's loss and gradient under the bf16 training
    matmuls agree with fp32, and the loss itself is computed in fp32."""
    images = binary_images(32, seed=4)
    results = {}
    for precision in ("fp32", "bf16"):
        monkeypatch.setattr(common, "_training_precision", precision)
        model = tiny_vae(z_dim=20, hidden_dim=vae.HIDDEN_DIM, seed=1).train()
        with common.training_precision():
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
        optimizer = torch.optim.Adam(model.parameters(), lr=vae.LEARNING_RATE, fused=fused)
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
    small sizes: batches of 32, 100 evaluation samples, a naive Monte-Carlo study of 2 x (10, 100)."""
    monkeypatch.setattr(vae, "BATCH_SIZE", 32)
    monkeypatch.setattr(vae, "EVALUATION_SAMPLES", 100)
    monkeypatch.setattr(vae, "NAIVE_MC_SAMPLE_COUNTS", (10, 100))
    monkeypatch.setattr(vae, "NAIVE_MC_REPEATS", 2)
    return fake_mnist.root


def argv(root, out, *flags):
    return ["--epochs", "2", "--zdim", "2", "--importance_samples", "4", "--device", "cpu",
            "--data_root", str(root), "--out", str(out), *flags]


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

    assert metrics["epochs_completed"] == 2
    assert metrics["setting"] == {**vae.OURS, "hidden_dim": 500, "batch_size": 32, "lr": 1e-3}
    assert metrics["training_precision"] == common.resolve_precision("auto", torch.device("cpu"))
    curves = metrics["curves"]
    assert set(curves) == {"train_negative_elbo", "val_negative_elbo", "wall_time_s"}
    assert all(len(values) == 3 for values in curves.values())  # epoch 0 (untrained), 1 and 2
    assert curves["wall_time_s"][0] == 0.0 < curves["wall_time_s"][1] < curves["wall_time_s"][2]
    assert curves["train_negative_elbo"][0] == pytest.approx(784 * math.log(2), rel=0.02)  # p = 1/2
    for split in ("validation", "test"):
        assert metrics[split]["importance_samples"] == 4
        # The same K log-weights: log-mean-exp >= mean, so the NLL estimate never exceeds the -ELBO.
        assert 0 < metrics[split]["nll_importance"] <= metrics[split]["negative_elbo"]
    naive = metrics["naive_mc"]
    assert (naive["images"], naive["repeats"]) == (5, 2)
    assert [row["samples"] for row in naive["rows"]] == [10, 100]
    assert all(len(row[key]) == 5 for row in naive["rows"] for key in row if key != "samples")
    assert metrics["evaluation"]["reference"] == "test" and metrics["evaluation"]["n_samples"] == 100
    assert metrics["n_params"] == sum(p.numel() for p in vae.VAE(500, 2, 2).parameters())

    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    group = saved["state"]["optimizer"]["param_groups"][0]
    assert group["fused"] and group["lr"] == pytest.approx(vae.get_lr(2, 2, True))
    assert sorted(saved["extra"]["samples"]) == [0, 1, 2]
    images = vae.load_sampler(out / "checkpoint.pt")(6)
    assert images.shape == (6, vae.IMAGE_DIM) and images.min() >= 0 and images.max() <= 1

    # --resume of the finished run trains nothing and rewrites the same numbers.
    assert_resume_keeps_the_run(lambda: run_main(smoke, out, "--resume"), out, metrics, capsys)

    # Resuming with other flags is refused, in one line that names the flag.
    assert_refused_in_one_line(lambda: vae.main(argv(smoke, out, "--resume", "--zdim", "3")),
                               "--zdim 2 (asked: 3)")

    # From the weights alone: every figure again, the same numbers (the bounds kept from the run).
    for figure in expected:
        (out / figure).unlink()
    assert_rebuild_reproduces_the_run(lambda: run_main(smoke, out, "--from_weights"), out, metrics)
    assert {p.name for p in out.iterdir()} == expected | {"weights.pt", "metrics.json", "train.log"}


def test_template_flag_trains_the_templates_model_the_templates_way(smoke, monkeypatch):
    calls = {"bmnist": [], "kl_weights": []}
    bmnist, kl_weights = vae.bmnist, vae.kl_weights
    monkeypatch.setattr(vae, "bmnist", lambda *args, **kwargs: calls["bmnist"].append(kwargs)
                        or bmnist(*args, **kwargs))
    monkeypatch.setattr(vae, "kl_weights", lambda *args: calls["kl_weights"].append(args)
                        or kl_weights(*args))
    out = smoke / "template"
    metrics = run_main(smoke, out, "--template")

    assert [kwargs["dynamic"] for kwargs in calls["bmnist"]] == [False]
    assert calls["kl_weights"] == [(1, 0), (2, 0)]
    assert metrics["setting"] == {**vae.TEMPLATE, "hidden_dim": 500, "batch_size": 32, "lr": 1e-3}
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    weights = [name for name in saved["state"]["model"] if name.endswith("weight")]
    assert weights == ["encoder.net.0.weight", "encoder.net.2.weight", "decoder.net.0.weight",
                       "decoder.net.2.weight"]  # one hidden layer each
    assert saved["state"]["optimizer"]["param_groups"][0]["lr"] == vae.LEARNING_RATE  # no decay
    assert metrics["n_params"] == sum(p.numel() for p in vae.VAE(500, 2, 1).parameters())
    assert vae.load_sampler(out / "checkpoint.pt")(3).shape == (3, 784)


def test_resume_after_a_nan_matches_an_uninterrupted_run(smoke, monkeypatch):
    uninterrupted = run_main(smoke, smoke / "straight")
    out = smoke / "resumed"
    kl_weights = vae.kl_weights
    with monkeypatch.context() as patch, pytest.raises(common.RunError, match="loss became nan"):
        patch.setattr(vae, "kl_weights", lambda epoch, warmup: (math.nan,) * 2 if epoch == 2
                      else kl_weights(epoch, warmup))
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
    with pytest.raises(SystemExit) as exit_info:
        common.cli(lambda: vae.main(argv(smoke, smoke / "out")))
    assert_one_line_error(exit_info, str(path), "corrupted or truncated")


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


def test_defaults_and_removed_flags():
    args = vae.parse_args([])
    assert (args.epochs, args.zdim, args.importance_samples, args.out) == (40, 20, 500, "results/vae")
    for removed in ("--hidden-dim", "--lr", "--batch-size", "--warmup-epochs"):
        with pytest.raises(SystemExit):
            vae.parse_args([removed, "1"])


def test_smoke_run_with_an_iaf_posterior_on_the_importance_weighted_bound(smoke):
    out = smoke / "iaf"
    metrics = run_main(smoke, out, "--posterior", "iaf", "--flow_steps", "2", "--iw_samples", "3")
    assert (metrics["args"]["posterior"], metrics["args"]["flow_steps"], metrics["args"]["iw_samples"]) == \
        ("iaf", 2, 3)
    assert metrics["data"] == {"binarized_mnist": "reproduction", "binarization_seed": 1234,
                               "dynamic_binarization": True}
    assert "uses the reproduction" in (out / "train.log").read_text()
    assert metrics["n_params"] == sum(p.numel() for p in vae.VAE(500, 2, 2, "iaf", 2).parameters())
    for split in ("validation", "test"):
        assert 0 < metrics[split]["nll_importance"] <= metrics[split]["negative_elbo"]
    images = vae.load_sampler(out / "checkpoint.pt")(4)
    assert images.shape == (4, vae.IMAGE_DIM)


def test_the_default_posterior_is_the_assignments_gaussian():
    args = vae.parse_args([])
    assert (args.posterior, args.iw_samples) == ("gaussian", 1)
    model = vae.VAE(vae.HIDDEN_DIM, 20, 2, args.posterior, args.flow_steps)
    assert model.flow is None and linear_shapes(model.encoder.net)[-1] == (500, 40)
