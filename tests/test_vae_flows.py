"""extensions.vae_flows: planar and IAF posteriors against autograd, closed forms and quadrature,
the importance-weighted bound against quadrature, its DReG gradient against the IWAE gradient and
the exact posterior of a linear-Gaussian model, and the module's command line end to end on a small
fake MNIST folder."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_rebuild_reproduces_the_run,
    assert_refused_in_one_line,
    assert_resume_keeps_the_run,
)
from test_vae import binary_images, quadrature_log_likelihood, tiny_vae

import a3_vae_template as vae
import harness
from datasets.loader import TensorLoader
from extensions import vae_flows as vf


def flow_vae(posterior, z_dim=3, flow_steps=3, seed=0, hidden_dim=16, iw_samples=1, iw_estimator="iwae"):
    torch.manual_seed(seed)
    return vf.FlowVAE(hidden_dim, z_dim, 1, posterior, flow_steps, iw_samples, iaf_hidden_dim=32,
                      iw_estimator=iw_estimator).eval()


def flow_and_context(posterior, z_dim=3, steps=3, seed=0):
    """A float64 flow and a random context for one image (planar: amortised u, w, b)."""
    model = flow_vae(posterior, z_dim, steps, seed).double()
    context = torch.randn(1, model.flow.context_dim, generator=torch.Generator().manual_seed(seed),
                          dtype=torch.float64)
    return model.flow, context


# ---------------------------------------------------------------- settings

def test_settings_add_the_extensions_fields_to_the_answers():
    assert {field.name for field in dataclasses.fields(vf.Settings)} == \
        {field.name for field in dataclasses.fields(vae.Settings)} | \
        {"posterior", "flow_steps", "iw_samples", "iaf_hidden_dim", "iaf_gate_bias", "iw_estimator"}
    assert (vf.DEFAULT.posterior, vf.DEFAULT.flow_steps, vf.DEFAULT.iw_samples) == ("iaf", 4, 1)
    assert vf.DEFAULT.iw_estimator == "iwae"
    assert harness.settings.differences(vf.DEFAULT, vf.Settings(**dataclasses.asdict(vae.DEFAULT))) == \
        {"epochs": 80}
    # --template: the answer's template training, with this module's posterior
    assert {name: getattr(vf.TEMPLATE, name) for name in dataclasses.asdict(vae.TEMPLATE)} == \
        dataclasses.asdict(vae.TEMPLATE)
    assert (vf.TEMPLATE.posterior, vf.TEMPLATE.flow_steps, vf.TEMPLATE.iw_samples) == ("iaf", 4, 1)


def test_the_gaussian_posterior_is_the_answers_vae():
    """posterior = gaussian, k = 1: the answer's parameters (the same names, the same initial values)
    and the same loss from the same noise."""
    flow = flow_vae("gaussian").train()
    torch.manual_seed(0)
    answer = vae.VAE(16, 3, 1).train()
    assert flow.flow is None and flow.context is None
    assert flow.state_dict().keys() == answer.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(flow.state_dict().values(), answer.state_dict().values(),
                                                 strict=True))
    x = binary_images(4)
    results = []
    for model in (flow, answer):
        torch.manual_seed(3)
        results.append(model.loss(x, 0.3))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- flows

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
    u_hat, one_plus_wu_hat = vf.constrain_planar_u(u, w)
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
        mean, std = model.encoder(x)
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
            model.context.weight.zero_()
            model.context.bias.zero_()
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


@pytest.mark.parametrize("posterior", ["planar", "iaf"])
def test_importance_sampled_likelihood_with_a_flow_posterior_matches_quadrature(posterior):
    """With q(z_K|x) = q_0(z_0|x) / prod |det|, the answer's NLL estimate is unbiased in p(x) whatever
    the flow: it must agree with quadrature, and the ELBO stay below it."""
    model = flow_vae(posterior, z_dim=1, flow_steps=4, seed=3)
    with torch.no_grad():
        model.decoder.net[-1].weight.mul_(8)
        if posterior == "planar":  # keep w away from 0, where u_hat (and the proposal) blows up
            model.context.bias.view(4, 3)[:, 1] += 1.5
    x = binary_images(4, seed=1)
    log_likelihood = quadrature_log_likelihood(model, x)
    negative_elbo, nll = vae.importance_bounds(model, TensorLoader(x, batch_size=4), 5000,
                                               torch.Generator().manual_seed(0))
    assert nll == pytest.approx(-log_likelihood.mean(), abs=0.1)
    assert negative_elbo > nll + 0.5


def test_iaf_steps_see_the_encoders_context():
    """IAF's m and s depend on the encoder's context h (Kingma et al., 2016, sec. 4): the same z_0 goes
    to another z_K under another h, in every dimension, both in the flow and through the posterior,
    where only the layer that makes h changes."""
    flow, context = flow_and_context("iaf", z_dim=3, steps=2)
    z_0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        z_k, log_det = flow(z_0, context)
        other_z_k, other_log_det = flow(z_0, context + torch.randn_like(context))
    assert (z_k - other_z_k).abs().min() > 1e-4 and (log_det - other_log_det).abs().min() > 1e-4

    model = flow_vae("iaf", z_dim=3, flow_steps=2, seed=1)
    x = binary_images(4, seed=2).reshape(4, -1)
    draws = []
    for perturbed in (False, True):
        with torch.no_grad():
            if perturbed:  # another h from the same hidden layer; q_0's mean and std stay as they were
                model.context.weight.add_(0.3 * torch.randn_like(model.context.weight))
            torch.manual_seed(5)
            draws.append(model.posterior(x)[:2])
    (z_k, log_q_over_p), (other_z_k, other_log_q_over_p) = draws
    assert (z_k - other_z_k).abs().min() > 1e-4 and (log_q_over_p - other_log_q_over_p).abs().min() > 1e-4


def invert_iaf(flow, z_k, context):
    """z_0 with flow(z_0) = z_k, step by step backwards: in each step's order, z_i = (z'_i - (1 -
    sigma_i) m_i) / sigma_i with m_i and sigma_i functions of the z_j before z_i, so D + 1 sweeps of
    that update from any start give the exact inverse (MADE's m and s, as IAFStep.forward makes them)."""
    z = z_k
    for step in reversed(flow.steps):
        target = z
        for _ in range(z.shape[-1] + 1):
            m, s = step.output(F.elu(step.input(z) + step.context(context))).chunk(2, dim=-1)
            sigma = torch.sigmoid(s)
            z = (target - (1 - sigma) * m) / sigma
    return z


def test_iaf_posterior_density_integrates_to_one_in_two_dimensions():
    """q(z_K|x) = q_0(z_0|x) / |det dz_K/dz_0| at z_0 = f^-1(z_K), summed over a fine 2-D grid of z_K,
    is 1. At z_dim = 2, unlike z_dim = 1, a (perturbed) IAF is not an affine map: the second variable's
    shift and gate depend on the first, so the check covers the autoregressive log-determinant."""
    model = flow_vae("iaf", z_dim=2, flow_steps=3, seed=3).double()
    with torch.no_grad():
        for step in model.flow.steps:
            step.output.weight.mul_(4)
    x = binary_images(1, seed=1).reshape(1, -1).double()
    with torch.no_grad():
        hidden = model.encoder.net[:-1](x)
        mean, log_std = model.encoder.net[-1](hidden).chunk(2, dim=-1)
        context = model.context(hidden)
        torch.manual_seed(0)
        samples = model.posterior(x, 20_000)[0][:, 0]
        low = samples.amin(0) - 3 * samples.std(0)
        high = samples.amax(0) + 3 * samples.std(0)
        axes = [torch.linspace(low[d].item(), high[d].item(), 601, dtype=torch.float64) for d in range(2)]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 1, 2)
        z_0 = invert_iaf(model.flow, grid, context)
        z_k, log_det = model.flow(z_0, context)
        torch.testing.assert_close(z_k, grid, rtol=0, atol=1e-9)
        eps = (z_0 - mean) / log_std.exp()
        log_q0 = (-0.5 * eps.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        cell = (axes[0][1] - axes[0][0]) * (axes[1][1] - axes[1][0])
        assert (torch.exp(log_q0 - log_det).sum() * cell).item() == pytest.approx(1, abs=1e-3)

    # Not affine: the Jacobian of z_0 -> z_K changes from one point to another, off its diagonal too.
    jacobians = [torch.autograd.functional.jacobian(lambda z: model.flow(z, context)[0][0], point)[:, 0]
                 for point in (z_0[0], z_0[-1])]
    assert (jacobians[0] - jacobians[1]).abs().min() > 0.01


# ---------------------------------------------------------------- importance-weighted bound

def test_importance_weighted_bound_with_one_sample_is_the_elbo_estimate():
    model = tiny_vae(z_dim=3, hidden_dim=16)
    x = binary_images(5).reshape(5, -1)
    torch.manual_seed(3)
    with torch.no_grad():
        bound, negative_elbo = vf.importance_weighted_loss(model, x, 1)
    reconstruction, regularisation = gaussian_reference(model, x, 3)
    torch.testing.assert_close(bound, reconstruction + regularisation)
    torch.testing.assert_close(negative_elbo, bound)
    # the KL warm-up's beta scales the log-weights' log p(z) - log q(z|x), as it scales L_reg
    torch.manual_seed(3)
    with torch.no_grad():
        warm, _ = vf.importance_weighted_loss(model, x, 1, kl_weight=0.25)
    torch.testing.assert_close(warm, reconstruction + 0.25 * regularisation)


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
            bounds = -vf.importance_weighted_loss(model, x.repeat(repeats, 1), k)[0].double()
            bounds = bounds.reshape(repeats, 2)
            means.append(bounds.mean(0).numpy())
            errors.append(bounds.std(0).numpy() / math.sqrt(repeats))
    for i in range(3):
        assert (means[i + 1] - means[i] > 3 * np.hypot(errors[i], errors[i + 1])).all(), means
    assert (means[-1] < log_likelihood + 3 * errors[-1]).all()
    np.testing.assert_allclose(means[-1], log_likelihood, atol=0.3)
    assert (log_likelihood - means[0] > 2).all()  # the ELBO's gap that the bound closes


def test_training_on_the_importance_weighted_bound_returns_the_negative_elbo(monkeypatch):
    """With iw_samples = k > 1 each step of the answer's epoch loop is on -L_k, and the epoch's value
    is still the negative ELBO; evaluation stays on the one-sample ELBO."""
    model = flow_vae("iaf", seed=2, iw_samples=6).train()
    batches = list(binary_images(8, seed=3).split(4))
    losses = []
    monkeypatch.setattr(harness, "check_finite", lambda loss, where: losses.append(loss.item()))
    settings = dataclasses.replace(vf.DEFAULT, lr=0.0, kl_warmup_epochs=0)
    torch.manual_seed(5)
    value = vae.epoch_iter(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), settings)
    torch.manual_seed(5)
    with torch.no_grad():
        expected = [vf.importance_weighted_loss(model, x.reshape(4, -1), 6) for x in batches]
    assert losses == pytest.approx([bound.mean().item() for bound, _ in expected], rel=1e-6)
    assert value == pytest.approx(torch.cat([elbo for _, elbo in expected]).mean().item(), rel=1e-6)
    assert all(elbo.mean() > bound.mean() for bound, elbo in expected)

    model.eval()
    torch.manual_seed(5)
    evaluated = vae.epoch_iter(model, batches, None)
    torch.manual_seed(5)
    with torch.no_grad():
        one_sample = torch.cat([sum(model.loss_terms(x)) for x in batches]).mean().item()
    assert evaluated == pytest.approx(one_sample, rel=1e-6)


# ---------------------------------------------------------------- the DReG gradient

def estimator_gradients(model, x, k, estimator, seed, kl_weight=1.0):
    """(-L_k [B], {name: gradient of the batch's sum of -L_k}) of ``estimator``, its z from ``seed``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, _ = vf.importance_weighted_loss(model, x, k, kl_weight, estimator)
    loss.sum().backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def dreg_test_vae(seed=1):
    model = tiny_vae(z_dim=2, hidden_dim=8, seed=seed, hidden_layers=1).double()
    with torch.no_grad():
        model.decoder.net[-1].weight.mul_(4)  # a posterior far from the Gaussian: unequal weights
    return model


@pytest.mark.parametrize("kl_weight", [1.0, 0.3])
def test_dreg_keeps_the_bound_and_the_decoders_iwae_gradient(kl_weight):
    """From the same z, DReG's value is -L_k and its decoder gradient is IWAE's; its encoder gradient
    is another (the two agree only in expectation, the next test)."""
    model = dreg_test_vae()
    x = binary_images(3, seed=2).reshape(3, -1).double()
    iwae_loss, iwae = estimator_gradients(model, x, 5, "iwae", seed=4, kl_weight=kl_weight)
    dreg_loss, dreg = estimator_gradients(model, x, 5, "dreg", seed=4, kl_weight=kl_weight)
    assert torch.equal(dreg_loss, iwae_loss)
    for name in iwae:
        if name.startswith("decoder"):
            torch.testing.assert_close(dreg[name], iwae[name], rtol=1e-10, atol=1e-12)
    assert max((dreg[name] - iwae[name]).abs().max() for name in iwae if name.startswith("encoder")) > 1e-2


@pytest.mark.parametrize("kl_weight", [1.0, 0.5])
def test_dreg_encoder_gradient_is_the_iwae_gradient_in_expectation(kl_weight):
    """Tucker et al. (2019, eq. 7): E[DReG's encoder gradient] = E[IWAE's], with beta (the KL warm-up)
    the weights (1 - beta) w~_i + beta w~_i^2. Checked on the encoder's output layer and first biases
    over 100 groups of 20 draws of both estimators from the same z, against the standard error of
    their difference, while IWAE's own mean is many standard errors from 0."""
    model = dreg_test_vae()
    x = binary_images(2, seed=2).reshape(2, -1).double().repeat(20, 1)
    names = ["encoder.net.0.bias", "encoder.net.2.weight", "encoder.net.2.bias"]
    differences, iwae_means = [], []
    for seed in range(100):
        iwae = estimator_gradients(model, x, 4, "iwae", seed, kl_weight)[1]
        dreg = estimator_gradients(model, x, 4, "dreg", seed, kl_weight)[1]
        iwae_means.append(torch.cat([iwae[name].flatten() for name in names]))
        differences.append(torch.cat([(dreg[name] - iwae[name]).flatten() for name in names]))
    differences, iwae_means = torch.stack(differences), torch.stack(iwae_means)
    difference_error = differences.std(0) / math.sqrt(len(differences))
    # The estimators differ draw by draw, but in the gradients of units that are dead for these images.
    assert (difference_error > 0).sum() >= 20
    assert (differences.mean(0).abs() <= 4.5 * difference_error).all()
    iwae_error = iwae_means.std(0) / math.sqrt(len(iwae_means))
    assert (iwae_means.mean(0).abs() > 10 * iwae_error).sum() >= 10  # a non-zero gradient to agree on


def gaussian_negative_log_likelihood(mean, x):
    """-log N(x; mean, I) summed over the 784 dimensions: the linear-Gaussian toy's p(x|z)."""
    return 0.5 * (x - mean).square().sum(-1) + 0.5 * vae.N_PIXELS * math.log(2 * math.pi)


def linear_gaussian_vae(scales=(1.5, 0.7), seed=0):
    """p(z) = N(0, I), p(x|z) = N(Wz + b, I) with orthogonal columns of W (norms ``scales``), and the
    encoder set to the exact posterior N(S W^T (x - b), S), S = (I + W^T W)^-1, diagonal. The
    decoder's "logits" are the Gaussian's mean (``gaussian_negative_log_likelihood`` replaces the
    Bernoulli reconstruction loss)."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.tensor(scales, dtype=torch.float64)
    z_dim = len(scales)
    directions = torch.randn(vae.N_PIXELS, z_dim, generator=generator, dtype=torch.float64)
    w = torch.linalg.qr(directions)[0] * scales
    b = 0.3 * torch.randn(vae.N_PIXELS, generator=generator, dtype=torch.float64)
    variance = 1 / (1 + scales.square())
    to_mean = variance[:, None] * w.T
    model = vae.VAE(hidden_dim=8, z_dim=z_dim, hidden_layers=1).double()
    model.decoder.net = torch.nn.Linear(z_dim, vae.N_PIXELS).double()
    model.encoder.net = torch.nn.Linear(vae.N_PIXELS, 2 * z_dim).double()
    with torch.no_grad():
        model.decoder.net.weight.copy_(w)
        model.decoder.net.bias.copy_(b)
        model.encoder.net.weight.copy_(torch.cat([to_mean, torch.zeros_like(to_mean)]))
        model.encoder.net.bias.copy_(torch.cat([-to_mean @ b, 0.5 * variance.log()]))
    x = (torch.randn(4, z_dim, generator=generator, dtype=torch.float64) @ w.T + b
         + torch.randn(4, vae.N_PIXELS, generator=generator, dtype=torch.float64))
    log_px = torch.distributions.MultivariateNormal(b, w @ w.T + torch.eye(vae.N_PIXELS)).log_prob(x)
    return model, x, log_px


@pytest.mark.parametrize("k", [1, 4])
def test_dreg_encoder_gradient_is_zero_at_the_exact_posterior(monkeypatch, k):
    """When q(z|x) is the true posterior every weight w_i is p(x), whatever z_i: d log w_i / d z_i = 0,
    so DReG's encoder gradient is 0 for every draw (Tucker et al., 2019, sec. 4; Roeder et al., 2017,
    at k = 1), while IWAE's is not: its score-function term is 0 only in expectation."""
    monkeypatch.setattr(vae, "reconstruction_loss", gaussian_negative_log_likelihood)
    model, x, log_px = linear_gaussian_vae()
    for i in range(len(x)):
        for seed in range(3):
            dreg_loss, dreg = estimator_gradients(model, x[i:i + 1], k, "dreg", seed)
            iwae_loss, iwae = estimator_gradients(model, x[i:i + 1], k, "iwae", seed)
            torch.testing.assert_close(-dreg_loss, log_px[i:i + 1], rtol=1e-10, atol=1e-8)  # every w_i = p(x)
            assert torch.equal(dreg_loss, iwae_loss)
            encoder = [name for name in dreg if name.startswith("encoder")]
            assert max(dreg[name].abs().max() for name in encoder) < 1e-8
            assert max(iwae[name].abs().max() for name in encoder) > 0.1


def test_the_dreg_setting_trains_the_gaussian_posterior_on_dregs_loss():
    """iw_estimator = "dreg" reaches the model, and its training loss is DReG's, even at k = 1 (the
    path-derivative ELBO gradient); evaluation stays on the answer's ELBO."""
    settings = dataclasses.replace(vf.DEFAULT, posterior="gaussian", iw_estimator="dreg")
    assert vf.FlowVAE.from_settings(settings).iw_estimator == "dreg"
    model = flow_vae("gaussian", iw_estimator="dreg").train()
    x = binary_images(4, seed=3).reshape(4, -1)
    torch.manual_seed(2)
    loss, negative_elbo = model.loss(x, 0.5)
    torch.manual_seed(2)
    expected = vf.importance_weighted_loss(model, x, 1, 0.5, "dreg")
    for ours, theirs in zip((loss, negative_elbo), expected, strict=True):
        torch.testing.assert_close(ours, theirs)
    with pytest.raises(ValueError, match="needs the flow's inverse"):
        vf.importance_weighted_loss(flow_vae("iaf"), x, 2, estimator="dreg")


# ---------------------------------------------------------------- command line

@pytest.fixture
def smoke(fake_mnist, small_splits, monkeypatch):
    monkeypatch.setattr(vae, "EVALUATION_SAMPLES", 100)
    monkeypatch.setattr(vae, "NAIVE_MC_SAMPLE_COUNTS", (10, 100))
    monkeypatch.setattr(vae, "NAIVE_MC_REPEATS", 2)
    return fake_mnist.root


def argv(root, out, *flags):
    settings = ("epochs=2", "z_dim=2", "importance_samples=4", "test_importance_samples=3", "batch_size=32",
                "iaf_hidden_dim=16")
    return [*(word for setting in settings for word in ("--set", setting)), "--device", "cpu",
            "--data_root", str(root), "--out", str(out), *flags]


def run_main(root, out, *flags):
    vf.main(argv(root, out, *flags))
    return json.loads((out / "metrics.json").read_text())


def test_smoke_run_with_an_iaf_posterior_on_the_importance_weighted_bound(smoke, capsys):
    out = smoke / "iaf"
    flow = ("--set", "flow_steps=2", "--set", "iw_samples=3")
    metrics = run_main(smoke, out, *flow)
    settings = metrics["settings"]
    assert settings == {**dataclasses.asdict(vf.DEFAULT), "epochs": 2, "z_dim": 2, "importance_samples": 4,
                        "test_importance_samples": 3, "batch_size": 32, "iaf_hidden_dim": 16, "flow_steps": 2,
                        "iw_samples": 3}
    assert (settings["posterior"], settings["flow_steps"], settings["iw_samples"]) == ("iaf", 2, 3)
    assert metrics["data"] == {"binarized_mnist": "reproduction", "binarization_seed": 1234,
                               "dynamic_binarization": True}
    assert "uses the reproduction" in (out / "train.log").read_text()
    assert metrics["n_params"] == sum(p.numel() for p in vf.FlowVAE(500, 2, 2, "iaf", 2, 3, 16).parameters())
    assert metrics["milestones"] == {"halfway": 1, "kl_warmup_end": 6}
    assert {"samples_end", "means_halfway", "manifold", "elbo"} <= metrics["figures"].keys()
    for split in ("validation", "test"):
        assert 0 < metrics[split]["nll_importance"] <= metrics[split]["negative_elbo"]
    assert metrics["naive_mc"]["repeats"] == 2
    images = vf.load_sampler(out / "checkpoint.pt")(4)
    assert images.shape == (4, vae.N_PIXELS)
    with pytest.raises(TypeError):  # the answer's sampler knows no flow settings
        vae.load_sampler(out / "checkpoint.pt")

    assert_resume_keeps_the_run(lambda: run_main(smoke, out, *flow, "--resume"), out, metrics, capsys)
    assert_refused_in_one_line(lambda: vf.main(argv(smoke, out, *flow, "--set", "flow_steps=3", "--resume")),
                               "flow_steps=2 (asked: 3)")
    assert_rebuild_reproduces_the_run(lambda: run_main(smoke, out, *flow, "--from_weights"), out, metrics)


def test_smoke_run_with_a_planar_posterior_and_the_templates_training(smoke):
    out = smoke / "planar"
    metrics = run_main(smoke, out, "--template", "--set", "posterior=planar", "--set", "flow_steps=3")
    settings = metrics["settings"]
    assert (settings["posterior"], settings["flow_steps"], settings["hidden_layers"]) == ("planar", 3, 1)
    assert settings["dynamic_binarization"] is False and settings["kl_warmup_epochs"] == 0
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert saved["state"]["model"]["context.weight"].shape == (3 * (2 * 2 + 1), 500)
    assert vf.load_sampler(out / "checkpoint.pt")(2).shape == (2, vae.N_PIXELS)


def test_an_unknown_posterior_ends_in_one_line(smoke):
    assert_refused_in_one_line(lambda: vf.main(argv(smoke, smoke / "out", "--set", "posterior=realnvp")),
                               "posterior=realnvp", "gaussian, planar, iaf")


@pytest.mark.parametrize("settings, fragments", [
    (("iw_estimator=reinforce",), ("iw_estimator=reinforce", "iwae, dreg")),
    (("iw_estimator=dreg",), ("iw_estimator=dreg", "posterior=gaussian, not iaf", "flow's inverse")),
    (("iw_estimator=dreg", "posterior=planar"), ("not planar",)),
])
def test_an_unknown_or_unsupported_estimator_ends_in_one_line(smoke, settings, fragments):
    flags = [word for setting in settings for word in ("--set", setting)]
    assert_refused_in_one_line(lambda: vf.main(argv(smoke, smoke / "out", *flags)), *fragments)


def test_defaults_and_help():
    args = vae.parse_args([], out="results/extensions/vae_iaf_k4", doc=vf.__doc__)
    assert harness.settings.resolve(args, vf.DEFAULT, vf.TEMPLATE) == vf.DEFAULT
    with pytest.raises(SystemExit):
        vf.main(["--help"])
