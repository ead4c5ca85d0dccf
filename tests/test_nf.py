"""The RealNVP flow against known answers: invertibility, exact log-determinants, closed-form
likelihoods of the identity flow, the learning-rate schedule and the training loop, and its command
line end to end on a small fake MNIST folder."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import (
    assert_one_line_error,
    assert_rebuild_reproduces_the_run,
    assert_refused_in_one_line,
    assert_resume_keeps_the_run,
    corrupt,
    needs_amx,
    record_precision,
)
from PIL import Image
from scipy import stats
from scipy.special import expit, logit
from torch import nn

import a3_nf_template as nf
import common
from datasets.loader import TensorLoader

ALPHA = nf.Model.ALPHA
COUPLING = nf.Coupling  # the script's class, kept before any test swaps in the small one


class SmallCoupling(COUPLING):
    """The script's coupling with a narrow network, so whole models are cheap to train and to
    differentiate; everything else (mask, tanh, zero init) is the script's own code."""

    def __init__(self, c_in, mask, conv_net=None):
        super().__init__(c_in, mask, n_hidden=16, conv_net=conv_net)


@pytest.fixture
def small_couplings(monkeypatch):
    monkeypatch.setattr(nf, "Coupling", SmallCoupling)


def perturb(module, seed=0, std=0.05):
    """Re-initialise the last layer of every coupling so that the flow is far from the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for coupling in module.modules():
            if isinstance(coupling, COUPLING):
                last = coupling.nn.output if isinstance(coupling.nn, nf.ConvNet) else coupling.nn[-1]
                last.weight.copy_(torch.randn(last.weight.shape, generator=generator) * std)
                last.bias.copy_(torch.randn(last.bias.shape, generator=generator) * std)
    return module


def pixel_images(n, seed=0):
    """Integer pixel values 0..255 as float [n, 784], every image holding a 0 and a 255."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, nf.N_PIXELS), generator=generator).float()
    images[:, 0], images[:, -1] = 0, 255
    return images


def mean_relative_error(actual, expected):
    return ((actual - expected).abs().mean() / expected.abs().mean()).item()


# ---------------------------------------------------------------- prior and mask

def test_log_prior_is_the_standard_normal_log_density():
    x = torch.linspace(-8, 8, 101, dtype=torch.float64)
    np.testing.assert_allclose(nf.log_prior(x).numpy(), stats.norm.logpdf(x.numpy()), rtol=1e-12)


def test_sample_prior_has_the_shape_and_moments_of_the_standard_normal():
    draws = nf.sample_prior((200, 784), generator=torch.Generator().manual_seed(0))
    assert draws.shape == (200, 784) and draws.dtype == torch.float32
    assert abs(draws.mean().item()) < 0.01  # 156,800 draws: the standard error is 0.0025
    assert draws.std().item() == pytest.approx(1.0, abs=0.01)
    assert stats.kstest(draws.flatten().numpy(), "norm").pvalue > 0.001
    again = nf.sample_prior((200, 784), generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_mask_is_the_checkerboard_with_ones_where_row_plus_column_is_even():
    mask = nf.get_mask()
    assert mask.shape == (1, 784) and mask.dtype == torch.float32
    rows, cols = np.indices((28, 28))
    np.testing.assert_array_equal(mask.numpy(), ((rows + cols) % 2 == 0).reshape(1, 784).astype(np.float32))
    assert mask[0, 0] == 1 and mask[0, 1] == 0 and mask[0, 28] == 0 and mask[0, 29] == 1


# ---------------------------------------------------------------- couplings

def test_coupling_network_is_the_template_mlp_and_starts_as_the_identity():
    coupling = nf.Coupling(c_in=784, mask=nf.get_mask())
    layers = list(coupling.nn)
    assert [type(layer) for layer in layers] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear,
                                                 torch.nn.ReLU, torch.nn.Linear]
    assert [(layer.in_features, layer.out_features) for layer in layers[::2]] == [
        (784, 1024), (1024, 1024), (1024, 2 * 784)]
    assert not layers[-1].weight.any() and not layers[-1].bias.any()

    z = torch.randn(8, 784)
    out, ldj = coupling(z, torch.zeros(8))
    assert torch.equal(out, z) and torch.equal(ldj, torch.zeros(8))


@pytest.mark.parametrize("bias, expected_log_scale", [(1e3, 1.0), (-1e3, -1.0)])
def test_log_scale_goes_through_tanh(bias, expected_log_scale):
    mask = nf.get_mask()
    coupling = nf.Coupling(c_in=784, mask=mask, n_hidden=8)
    with torch.no_grad():
        coupling.nn[-1].bias[:784] = bias  # the log-scale half; the translation half stays 0
    z = torch.randn(4, 784)
    log_scale, translation = coupling.scale_and_translation(z)
    assert log_scale.abs().max() <= 1
    torch.testing.assert_close(log_scale, expected_log_scale * (1 - mask).expand(4, -1))
    assert not translation.any()

    out, ldj = coupling(z, torch.zeros(4))
    torch.testing.assert_close(out, z * torch.exp(expected_log_scale * (1 - mask)))
    torch.testing.assert_close(ldj, torch.full((4,), expected_log_scale * 392))  # 392 unmasked pixels


def round_trip_errors(module, z):
    """(relative error of reverse(forward(z)), |ldj_forward + ldj_reverse| relative to |ldj_forward|)."""
    zeros = torch.zeros(len(z))
    with torch.no_grad():
        forward, ldj_forward = module(z, zeros)
        back, ldj_reverse = module(forward, zeros, reverse=True)
    scale = ldj_forward.abs().clamp(min=1.0)
    return (mean_relative_error(back, z), ((ldj_forward + ldj_reverse).abs() / scale).max().item(),
            forward, ldj_forward)


BUILDS = {"coupling": lambda: nf.Coupling(c_in=784, mask=nf.get_mask()),
          "flow": lambda: nf.Flow([784], n_flows=2),
          "conv coupling": lambda: nf.Coupling(c_in=784, mask=nf.get_mask(), conv_net=nf.ConvNet()),
          "conv flow": lambda: nf.Flow([784], n_flows=2, conv_net=nf.ConvNet)}


@pytest.mark.parametrize("build", BUILDS.values(), ids=BUILDS.keys())
@pytest.mark.parametrize("perturbed", [False, True], ids=["identity", "perturbed"])
def test_reverse_undoes_forward(build, perturbed):
    torch.manual_seed(0)
    module = build()
    if perturbed:
        perturb(module)
    z = torch.randn(16, 784)
    error, ldj_error, forward, ldj = round_trip_errors(module, z)
    assert error < 1e-5
    assert ldj_error < 1e-5
    if perturbed:  # the round trip was not trivial
        assert mean_relative_error(forward, z) > 0.05
        assert ldj.abs().max() > 1.0
    else:
        assert torch.equal(forward, z) and not ldj.any()


def test_perturbed_coupling_passes_the_masked_pixels_through_unchanged():
    mask = nf.get_mask()
    coupling = perturb(nf.Coupling(c_in=784, mask=mask))
    z = torch.randn(4, 784)
    with torch.no_grad():
        out, ldj = coupling(z, torch.zeros(4))
        log_scale, _ = coupling.scale_and_translation(z)
    kept = mask[0].bool()
    assert torch.equal(out[:, kept], z[:, kept])
    assert not torch.equal(out[:, ~kept], z[:, ~kept])
    torch.testing.assert_close(ldj, log_scale.sum(1))


def test_logit_normalize_round_trip_on_dequantized_data():
    model = nf.Model([784])
    x = model.dequantize(pixel_images(16), torch.Generator().manual_seed(1))
    assert x.min() >= 0 and x.max() < 256
    zeros = torch.zeros(16)
    y, ldj_forward = model.logit_normalize(x, zeros)
    assert torch.isfinite(y).all()
    back, ldj_reverse = model.logit_normalize(y, zeros, reverse=True)
    assert mean_relative_error(back, x) < 1e-5
    assert ((ldj_forward + ldj_reverse).abs() / ldj_forward.abs()).max() < 1e-5


# ---------------------------------------------------------------- exact log-likelihoods

@pytest.mark.parametrize("coupling", ["mlp", "conv"])
def test_log_determinant_matches_the_full_jacobian(small_couplings, coupling):
    torch.manual_seed(0)
    model = perturb(nf.Model([784], coupling=coupling), std=0.2).double()
    pixels = pixel_images(3, seed=2).double()
    noise_seed = 5

    def to_latent(x):
        y, ldj = model.logit_normalize(x, torch.zeros(len(x), dtype=x.dtype))
        return model.flow(y, ldj)

    x = model.dequantize(pixels, torch.Generator().manual_seed(noise_seed))
    with torch.no_grad():
        z, ldj = to_latent(x)
        log_px = model(pixels, generator=torch.Generator().manual_seed(noise_seed))
        identity_ldj = nf.Model([784]).double().logit_normalize(x, torch.zeros(3, dtype=x.dtype))[1]
    for i in range(len(x)):
        jacobian = torch.autograd.functional.jacobian(lambda xi: to_latent(xi[None])[0][0], x[i],
                                                      vectorize=True)
        assert jacobian.shape == (784, 784)
        sign, log_abs_det = torch.linalg.slogdet(jacobian)
        assert sign != 0
        assert ldj[i].item() == pytest.approx(log_abs_det.item(), abs=1e-6)
        assert abs(ldj[i] - identity_ldj[i]) > 1  # the couplings contribute a non-trivial part

        # forward() is the change of variables: log N(z) plus log |det dz/dx|.
        expected = stats.norm.logpdf(z[i].numpy()).sum() + log_abs_det.item()
        assert log_px[i].item() == pytest.approx(expected, rel=1e-10)
    torch.testing.assert_close(nf.bits_per_dim(log_px), -log_px / (784 * math.log(2)))


def closed_form_log_px(pixels, noise):
    """log p(x) of the flow whose couplings are all the identity, in float64 with numpy: the
    logit transform alone maps the dequantized image to z."""
    x = (pixels + noise).numpy().astype(np.float64)  # the sum the model also forms, in its precision
    p = ALPHA / 2 + (1 - ALPHA) * x / 256
    z = logit(p)
    log_det = (np.log(1 - ALPHA) - np.log(256) - np.log(p) - np.log1p(-p)).sum(1)
    return stats.norm.logpdf(z).sum(1) + log_det


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-10)],
                         ids=["float32", "float64"])
def test_identity_flow_likelihood_and_bits_per_dim_match_the_closed_form(dtype, rtol):
    model = nf.Model([784]).to(dtype)
    pixels = pixel_images(8, seed=3).to(dtype)
    noise = torch.rand(pixels.shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        log_px = model(pixels, generator=torch.Generator().manual_seed(7))
    assert log_px.dtype == dtype
    expected = closed_form_log_px(pixels, noise)
    np.testing.assert_allclose(log_px.double().numpy(), expected, rtol=rtol)
    np.testing.assert_allclose(nf.bits_per_dim(log_px).double().numpy(), -expected / (784 * np.log(2)),
                               rtol=rtol)


def test_sampling_gives_finite_images_in_the_pixel_range():
    model = nf.Model([784])
    samples = model.sample(32, torch.Generator().manual_seed(0))
    assert samples.shape == (32, 784)
    assert torch.isfinite(samples).all() and samples.min() >= 0 and samples.max() < 256

    # With identity couplings a sample is the inverse logit transform of the prior draw.
    z = torch.randn(32, 784, generator=torch.Generator().manual_seed(0)).double().numpy()
    expected = np.clip((expit(z) - ALPHA / 2) / (1 - ALPHA) * 256, 0, 256 - 1e-3)
    np.testing.assert_allclose(samples.double().numpy(), expected, rtol=1e-5, atol=1e-3)

    perturbed = perturb(nf.Model([784]), std=0.2).sample(32, torch.Generator().manual_seed(0))
    assert torch.isfinite(perturbed).all() and perturbed.min() >= 0 and perturbed.max() < 256
    assert (perturbed - samples).abs().mean() > 1


BUILDS = {"coupling": lambda: nf.Coupling(c_in=784, mask=nf.get_mask()),
          "flow": lambda: nf.Flow([784], n_flows=2),
          "conv coupling": lambda: nf.Coupling(c_in=784, mask=nf.get_mask(), conv_net=nf.ConvNet()),
          "conv flow": lambda: nf.Flow([784], n_flows=2, conv_net=nf.ConvNet)}


@pytest.mark.parametrize("build", BUILDS.values(), ids=BUILDS.keys())
def test_the_courses_unit_test_contract(build):
    """The course's check: forward, then reverse with the forward's log-determinant, gives the input
    back and a log-determinant of zero (here on a flow far from the identity)."""
    torch.manual_seed(1)
    module = perturb(build(), seed=1)
    x = torch.randn(8, 784)
    with torch.no_grad():
        z, ldj = module(x, torch.zeros(8))
        x_back, ldj_back = module(z, ldj, reverse=True)
    assert ldj.abs().max() > 1.0 and (z - x).abs().mean() > 0.05  # not a trivial round trip
    torch.testing.assert_close(x_back, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ldj_back, torch.zeros(8), rtol=0, atol=1e-4)


def test_conv_coupling_network_sees_the_masked_image_and_the_mask_and_starts_as_the_identity():
    coupling = nf.Coupling(c_in=784, mask=nf.get_mask(), conv_net=nf.ConvNet())
    assert coupling.nn.input.in_channels == 4 * 2  # masked image and mask, squeezed 2x2
    assert not coupling.nn.output.weight.any() and not coupling.nn.output.bias.any()
    z = torch.randn(8, 784)
    out, ldj = coupling(z, torch.zeros(8))
    assert torch.equal(out, z) and torch.equal(ldj, torch.zeros(8))
    # Perturbed, the scale and translation depend only on the masked pixels.
    perturb(coupling, std=0.2)
    masked_out = coupling.scale_and_translation(z)
    changed = z + 5 * (1 - coupling.mask) * torch.randn(8, 784)
    for ours, theirs in zip(masked_out, coupling.scale_and_translation(changed), strict=True):
        torch.testing.assert_close(ours, theirs)
        assert ours.abs().max() > 0.05


def test_conv_flow_has_under_one_percent_of_the_template_flows_parameters():
    n_params = [sum(p.numel() for p in nf.Model([784], coupling=coupling, dequantization=dequantization)
                    .parameters()) for coupling, dequantization in
                [("mlp", "uniform"), ("conv", "uniform"), ("conv", "variational")]]
    assert n_params[0] > 27e6
    assert n_params[1] < n_params[2] < 0.01 * n_params[0]


def perturbed_dequantizer(seed=0):
    torch.manual_seed(seed)
    return perturb(nf.VariationalDequantization(), seed=seed, std=0.2)


def test_variational_dequantization_log_density_matches_its_jacobian():
    """log q(u | x) = log Logistic(e) - log |det du/de|, with du/de from autograd (float64), for the
    logistic draw e the dequantizer makes from its generator."""
    dequantizer = perturbed_dequantizer().double()
    pixels = pixel_images(2, seed=4).double()
    context = (pixels / 255).view(-1, 1, 28, 28)
    with torch.no_grad():
        noise, log_q = dequantizer(pixels, torch.Generator().manual_seed(9))
    uniform = torch.rand(pixels.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    uniform = uniform.clamp(min=1e-7)
    e = torch.log(uniform) - torch.log1p(-uniform)
    assert noise.min() > 0 and noise.max() < 1
    for i in range(len(pixels)):
        def to_noise(ei, i=i):
            g, _ = dequantizer.flow(ei[None], torch.zeros(1, dtype=ei.dtype), context=context[i:i + 1])
            return torch.sigmoid(g)[0]
        torch.testing.assert_close(to_noise(e[i]), noise[i])
        jacobian = torch.autograd.functional.jacobian(to_noise, e[i], vectorize=True)
        sign, log_abs_det = torch.linalg.slogdet(jacobian)
        assert sign > 0
        expected = stats.logistic.logpdf(e[i].numpy()).sum() - log_abs_det.item()
        assert log_q[i].item() == pytest.approx(expected, rel=1e-9)
        assert abs(log_q[i].item()) > 1  # q is not the uniform density


def test_untrained_variational_dequantization_is_the_uniform_one():
    """The zero-initialised dequantizer draws u ~ U(0, 1) with log q = 0, so the variational bound
    equals the uniform bits/dim on the same flow and noise seed; trained (perturbed) it differs."""
    torch.manual_seed(0)
    variational = nf.Model([784], coupling="conv", dequantization="variational")
    perturb(variational.flow, std=0.1)
    uniform = nf.Model([784], coupling="conv")
    uniform.flow.load_state_dict(variational.flow.state_dict())
    pixels = pixel_images(4, seed=5)
    with torch.no_grad():
        noise, log_q = variational.dequantizer(pixels, torch.Generator().manual_seed(3))
        expected = torch.rand(pixels.shape, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(noise, expected, rtol=0, atol=1e-6)
        assert not log_q.any()
        bound = variational(pixels, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(bound, uniform(pixels, generator=torch.Generator().manual_seed(3)))
        perturb(variational.dequantizer, std=0.2)
        trained = variational(pixels, generator=torch.Generator().manual_seed(3))
    assert (trained - bound).abs().min() > 1


@pytest.mark.parametrize("dequantization", ["uniform", "variational"])
def test_importance_weighted_bpd_with_one_sample_is_the_bounds_and_more_samples_tighten_it(dequantization):
    torch.manual_seed(0)
    model = perturb(nf.Model([784], coupling="conv", dequantization=dequantization), std=0.1).eval()
    loader = TensorLoader(pixel_images(6, seed=7), torch.zeros(6), batch_size=3)
    bound = nf.epoch_iter(model, loader, None)
    assert nf.importance_weighted_bpd(model, loader, samples=1) == pytest.approx(bound, rel=1e-7)
    # S = 4 draws: -log mean exp of the draws' log-likelihoods, below their average (Jensen).
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        draws = [torch.stack([model(imgs, generator=generator) for _ in range(4)]) for imgs, _ in loader]
    log_w = torch.cat(draws, dim=1)
    expected = nf.bits_per_dim(torch.logsumexp(log_w, 0) - math.log(4)).mean().item()
    estimate = nf.importance_weighted_bpd(model, loader, samples=4)
    assert estimate == pytest.approx(expected, rel=1e-7)
    assert estimate < nf.bits_per_dim(log_w).mean().item() - 1e-4


# ---------------------------------------------------------------- learning rate

def test_learning_rate_warms_up_over_the_first_epoch_then_decays_along_a_half_cosine():
    setting, lr = nf.OURS, nf.OURS["lr"]
    steps, total = 10, 400  # 10 steps per epoch, 40 epochs

    def rate(step):
        return nf.get_lr(step, total, setting, steps)

    assert [rate(step) for step in (0, 4, 9)] == pytest.approx([lr / 10, lr / 2, lr])
    assert rate(10) == lr  # the cosine starts at its top
    assert rate(10 + 195) == pytest.approx(lr / 2)  # halfway through the 390 decaying steps
    assert rate(total - 1) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 389 / 390)))
    assert rate(total) == pytest.approx(0, abs=1e-20)
    decay = [rate(step) for step in range(10, total)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))


def test_learning_rate_without_warm_up_or_decay():
    assert {nf.get_lr(step, 400, nf.TEMPLATE, 10) for step in range(400)} == {1e-3}
    cosine_only = {**nf.OURS, "warmup_epochs": 0}
    assert nf.get_lr(0, 100, cosine_only, 10) == nf.OURS["lr"]
    assert nf.get_lr(50, 100, cosine_only, 10) == pytest.approx(nf.OURS["lr"] / 2)


def test_settings_ours_and_the_templates():
    assert nf.OURS == {"batch_size": 256, "lr": 5e-4, "warmup_epochs": 1, "cosine_decay": True, "clip": 100.0}
    assert nf.TEMPLATE == {"batch_size": 128, "lr": 1e-3, "warmup_epochs": 0, "cosine_decay": False,
                           "clip": None}


# ---------------------------------------------------------------- the epoch loop

def test_eval_epoch_is_the_deterministic_average_bpd_without_gradients(small_couplings, monkeypatch):
    model = perturb(nf.Model([784])).eval()
    images = pixel_images(10, seed=4)
    loader = TensorLoader(images, torch.zeros(10), batch_size=4)  # batches of 4, 4, 2

    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        expected = torch.cat([nf.bits_per_dim(model(batch, generator=noise)) for batch in images.split(4)])

    needs_grad = []
    bits_per_dim = nf.bits_per_dim

    def recording_bits_per_dim(log_px):
        needs_grad.append(log_px.requires_grad)
        return bits_per_dim(log_px)

    monkeypatch.setattr(nf, "bits_per_dim", recording_bits_per_dim)
    first = nf.epoch_iter(model, loader, None)
    second = nf.epoch_iter(model, loader, None)
    assert first == second
    assert first == pytest.approx(expected.mean().item(), rel=1e-6)
    assert needs_grad == [False] * 6
    assert all(p.grad is None for p in model.parameters())


class RecordingSGD(torch.optim.SGD):
    """SGD that notes the learning rate of every step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rates = []

    def step(self, closure=None):
        self.rates.append(self.param_groups[0]["lr"])
        return super().step(closure)


def test_train_epoch_averages_bpd_before_each_step_and_learns(small_couplings):
    torch.manual_seed(0)
    model = nf.Model([784]).train()
    images = pixel_images(8, seed=5)
    loader = TensorLoader(images, torch.zeros(8), batch_size=8)

    # A zero learning rate: the returned value is the bpd of the batch under the global RNG's noise.
    torch.manual_seed(1)
    with torch.no_grad():
        expected = nf.bits_per_dim(model(images)).mean().item()
    torch.manual_seed(1)
    frozen = nf.epoch_iter(model, loader, torch.optim.SGD(model.parameters(), lr=1.0), lr_at=lambda step: 0.0)
    assert frozen == pytest.approx(expected, rel=1e-6)
    assert all(p.grad is not None for p in model.parameters())

    model.eval()
    before = nf.epoch_iter(model, loader, None)
    model.train()
    optimizer = torch.optim.Adam(model.parameters())
    for epoch in range(10):
        nf.epoch_iter(model, loader, optimizer, lr_at=lambda step: 1e-3, clip=100.0, first_step=epoch)
    model.eval()
    assert nf.epoch_iter(model, loader, None) < before - 0.01


def test_each_training_step_takes_the_learning_rate_of_its_global_step(small_couplings, monkeypatch):
    clipped = []
    clip_gradients = nf.clip_gradients
    monkeypatch.setattr(nf, "clip_gradients", lambda model, max_norm: clipped.append(max_norm)
                        or clip_gradients(model, max_norm))
    model = nf.Model([784]).train()
    loader = TensorLoader(pixel_images(12, seed=6), torch.zeros(12), batch_size=4)
    optimizer = RecordingSGD(model.parameters(), lr=1.0)
    steps = []

    def lr_at(step):
        steps.append(step)
        return 1e-4 * (step + 1)

    nf.epoch_iter(model, loader, optimizer, lr_at=lr_at, clip=5.0, first_step=7)
    assert steps == [7, 8, 9] and optimizer.rates == pytest.approx([8e-4, 9e-4, 1e-3])
    assert clipped == [5.0] * 3
    nf.epoch_iter(model, loader, optimizer, lr_at=lr_at)
    assert steps[3:] == [0, 1, 2] and clipped == [5.0] * 3  # no clip: clip_gradients is not called


def test_training_with_the_default_lr_at_keeps_the_optimizers_learning_rate(small_couplings):
    model = nf.Model([784]).train()
    optimizer = RecordingSGD(model.parameters(), lr=1e-3)
    nf.epoch_iter(model, TensorLoader(pixel_images(4), torch.zeros(4), batch_size=4), optimizer)
    assert optimizer.rates == [1e-3]


def test_a_nan_loss_stops_training_before_the_step(small_couplings):
    model = nf.Model([784]).train()
    with torch.no_grad():
        model.flow.layers[0].nn[-1].bias.fill_(math.nan)
    optimizer = RecordingSGD(model.parameters(), lr=0.1)
    with pytest.raises(common.RunError, match="loss became nan at training step 4"):
        nf.epoch_iter(model, TensorLoader(pixel_images(4), torch.zeros(4), batch_size=4), optimizer,
                      lr_at=lambda step: 0.1, first_step=4)
    assert optimizer.rates == []


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_gradients_matches_clip_grad_norm(max_norm):
    """The speed-up of clip_gradients keeps the result: above the threshold the gradients are scaled
    exactly as by clip_grad_norm_; below it they are left bit for bit as they were."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
        model(torch.randn(8, 6)).square().sum().backward()
        models.append(model)
    before = [p.grad.clone() for p in models[0].parameters()]
    nf.clip_gradients(models[0], max_norm)
    nn.utils.clip_grad_norm_(models[1].parameters(), max_norm)
    for ours, reference, original in zip(models[0].parameters(), models[1].parameters(), before,
                                         strict=True):
        torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-6, atol=0)
        if max_norm > 1:
            assert torch.equal(ours.grad, original)
    total = nn.utils.get_total_norm([p.grad for p in models[0].parameters()])
    assert total <= max_norm * (1 + 1e-5) and (max_norm > 1 or total == pytest.approx(max_norm))


def test_fused_adam_trains_as_plain_adam(small_couplings):
    """The script's fused Adam is a speed-up only: two steps of epoch_iter, clipping included, give
    the parameters and the bpd of torch's plain Adam."""
    loader = TensorLoader(pixel_images(16, seed=8), torch.zeros(16), batch_size=8)
    models, values = [], []
    for fused in (True, False):
        torch.manual_seed(0)
        model = perturb(nf.Model([784])).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=nf.OURS["lr"], fused=fused)
        torch.manual_seed(1)
        values.append(nf.epoch_iter(model, loader, optimizer, lambda step: nf.OURS["lr"], clip=1.0))
        models.append(model)
    for fused, plain in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(fused, plain, rtol=0, atol=1e-6)
    assert values[0] == pytest.approx(values[1], rel=1e-6)


def test_run_epoch_trains_in_the_runs_precision_and_validates_in_fp32(small_couplings, monkeypatch):
    monkeypatch.setattr(common, "_training_precision", "bf16")
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    model = nf.Model([784])
    seen = []
    record_precision(model.flow.layers[0].nn[0], seen)
    train = TensorLoader(pixel_images(8), torch.zeros(8), batch_size=4)
    val = TensorLoader(pixel_images(4, seed=1), torch.zeros(4), batch_size=4)
    nf.run_epoch(model, (train, val), torch.optim.SGD(model.parameters()), lambda step: 0.0)
    assert seen == [(True, "bf16"), (True, "bf16"), (False, "ieee")]
    assert torch.backends.mkldnn.matmul.fp32_precision == "ieee" and not model.training


@needs_amx
def test_bf16_training_step_keeps_the_loss_and_gradient_of_fp32(monkeypatch):
    """On a fixed seed and batch, the full-size model's bpd and gradient under bf16 training matmuls
    agree with fp32, and the log-likelihood stays fp32."""
    images = pixel_images(16, seed=6)
    results = {}
    for precision in ("fp32", "bf16"):
        monkeypatch.setattr(common, "_training_precision", precision)
        torch.manual_seed(1)
        model = perturb(nf.Model([784]), std=0.01).train()
        with common.training_precision():
            torch.manual_seed(2)
            log_px = model(images)
            assert log_px.dtype == torch.float32
            loss = nf.bits_per_dim(log_px).mean()
            loss.backward()
        results[precision] = loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])
    (loss_fp32, grad_fp32), (loss_bf16, grad_bf16) = results["fp32"], results["bf16"]
    assert loss_bf16 == pytest.approx(loss_fp32, abs=1e-3)
    assert torch.cosine_similarity(grad_bf16, grad_fp32, dim=0) > 0.999
    assert (grad_bf16.norm() / grad_fp32.norm()).item() == pytest.approx(1, abs=0.01)


# ---------------------------------------------------------------- figures

@pytest.fixture
def curves_drawn(monkeypatch):
    calls = []
    monkeypatch.setattr(common, "save_curves", lambda curves, stem, **kwargs: calls.append(kwargs))
    return calls


def test_bpd_plot_shows_the_range_that_matters_with_the_assignments_bar(curves_drawn):
    nf.save_bpd_plot([2.5, 1.6, 1.4], [2.4, 1.7, 1.5], "bpd")
    (kwargs,) = curves_drawn
    assert kwargs["references"] == {"assignment's bar": 1.85} and kwargs["start"] == 1
    assert kwargs["ylim"] == pytest.approx((1.38, 2.02))  # the untrained first epoch is cut off at 2
    nf.save_bpd_plot([1.6, 1.4], [1.7, 1.5], "bpd")
    assert curves_drawn[1]["ylim"] == pytest.approx((1.38, 1.72))


def test_bpd_plot_of_a_run_above_two_bits_per_dim_shows_its_curves(curves_drawn):
    nf.save_bpd_plot([3.0, 2.6], [2.9, 2.7], "bpd")
    low, high = curves_drawn[0]["ylim"]
    assert low < high and low <= 2.6 and high >= 2.7


# ---------------------------------------------------------------- command line

@pytest.fixture
def smoke(fake_mnist, small_splits, small_couplings, monkeypatch):
    """The script on the fake MNIST folder with its real data, evaluation and classifier code, small
    couplings, our setting at batch 32 (3 steps per epoch on 80 images) and 100 evaluation samples."""
    monkeypatch.setitem(nf.OURS, "batch_size", 32)
    monkeypatch.setattr(nf, "EVALUATION_SAMPLES", 100)
    return fake_mnist.root


def argv(root, out, *flags):
    return ["--epochs", "2", "--device", "cpu", "--data_root", str(root), "--out", str(out), *flags]


def run_main(root, out, *flags):
    nf.main(argv(root, out, *flags))
    return json.loads((out / "metrics.json").read_text())


def test_smoke_run_writes_every_output_and_resuming_it_reproduces_the_numbers(smoke, monkeypatch, capsys):
    clipped = []
    clip_gradients = nf.clip_gradients
    monkeypatch.setattr(nf, "clip_gradients", lambda model, max_norm: clipped.append(max_norm)
                        or clip_gradients(model, max_norm))
    out = smoke / "nf"
    metrics = run_main(smoke, out, "--resume")

    stems = ["bpd", "samples_start", "samples_halfway", "samples_end", "memorisation"]
    expected = {f"{stem}.{ext}" for stem in stems for ext in ("png", "pdf")}
    assert {p.name for p in out.iterdir()} == expected | {"epochs", "metrics.json", "checkpoint.pt",
                                                          "weights.pt", "train.log"}
    assert {p.name for p in (out / "epochs").iterdir()} == {"epoch_01.png", "epoch_02.png"}
    assert Image.open(out / "epochs" / "epoch_02.png").size == (8 * 30 + 2, 8 * 30 + 2)

    assert metrics["setting"] == {**nf.OURS, "batch_size": 32}
    assert metrics["args"]["epochs"] == 2 and metrics["epochs_completed"] == 2
    curves = metrics["curves"]
    assert set(curves) == {"train_bpd", "val_bpd", "wall_time_s"}
    assert all(len(values) == 2 for values in curves.values())
    assert 0 < curves["wall_time_s"][0] < curves["wall_time_s"][1] == metrics["wall_time_s"]
    assert metrics["images_per_s"] == pytest.approx(2 * 80 / metrics["wall_time_s"])
    assert metrics["n_params"] == sum(p.numel() for p in nf.Model([784]).parameters())
    assert all(4 < bpd < 12 for bpd in curves["train_bpd"] + curves["val_bpd"])
    assert clipped == [100.0] * 6  # every step of both epochs

    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    group = saved["state"]["optimizer"]["param_groups"][0]
    # The last of 6 steps: 3 warm-up steps, then 2/3 of the way down the half cosine.
    assert group["fused"] and group["weight_decay"] == 0
    assert group["lr"] == pytest.approx(nf.get_lr(5, 6, nf.OURS, 3)) == pytest.approx(5e-4 / 4)

    # The test bpd is the deterministic evaluation pass of the saved model over the test images.
    model = nf.Model([784])
    model.load_state_dict(saved["state"]["model"])
    test_loader = nf.mnist(smoke, batch_size=32)[2]
    assert metrics["test"]["bpd"] == pytest.approx(nf.epoch_iter(model.eval(), test_loader, None), rel=1e-6)
    assert metrics["evaluation"]["reference"] == "test" and metrics["evaluation"]["n_samples"] == 100
    sampled = nf.load_sampler(out / "checkpoint.pt")(20)
    assert sampled.shape == (20, 784) and torch.equal(sampled * 255, (sampled * 255).round())
    assert torch.equal(sampled, nf.sample_images(model, 20))

    assert_resume_keeps_the_run(lambda: run_main(smoke, out, "--resume"), out, metrics, capsys)
    assert_refused_in_one_line(lambda: nf.main(argv(smoke, out, "--resume", "--epochs", "3")),
                               "--epochs 2 (asked: 3)")


def test_conv_flow_with_variational_dequantization_end_to_end(smoke, monkeypatch):
    """--coupling conv --dequantization variational trains the conv setting, reports both test
    estimates, samples through load_sampler, and rebuilds from its weights with the same numbers."""
    monkeypatch.setitem(nf.CONV_TRAINING, "batch_size", 32)
    monkeypatch.setattr(nf, "NOISE_SAMPLES", 3)
    out = smoke / "conv"
    flags = ("--coupling", "conv", "--dequantization", "variational")
    metrics = run_main(smoke, out, *flags)
    assert metrics["setting"] == {**nf.OURS, **nf.CONV_TRAINING}
    model = nf.Model([784], coupling="conv", dequantization="variational")
    assert metrics["n_params"] == sum(p.numel() for p in model.parameters())
    model.load_state_dict(torch.load(out / "weights.pt", weights_only=True)["model"])
    test_loader = nf.mnist(smoke, batch_size=32)[2]
    test = metrics["test"]
    assert test["noise_samples"] == 3
    assert test["bpd"] == pytest.approx(nf.epoch_iter(model.eval(), test_loader, None), rel=1e-6)
    assert test["bpd_importance_weighted"] == pytest.approx(nf.importance_weighted_bpd(model, test_loader, 3),
                                                            rel=1e-6)
    assert test["bpd_importance_weighted"] < test["bpd"]
    torch.testing.assert_close(nf.load_sampler(out / "checkpoint.pt")(8), nf.sample_images(model, 8))
    assert_rebuild_reproduces_the_run(lambda: run_main(smoke, out, *flags, "--from_weights"), out, metrics)


def test_resume_after_a_nan_matches_an_uninterrupted_run(smoke, monkeypatch):
    """The crash in epoch 2 keeps the checkpoint of epoch 1; resuming it continues the schedule from
    global step 3 and trains what the uninterrupted run trained."""
    uninterrupted = run_main(smoke, smoke / "straight")
    out = smoke / "resumed"
    run_epoch = nf.run_epoch

    def poisoned_in_epoch_two(model, data, optimizer, lr_at=None, clip=None, first_step=0):
        if first_step == 3:
            with torch.no_grad():
                model.flow.layers[0].nn[-1].bias.fill_(math.nan)
        return run_epoch(model, data, optimizer, lr_at, clip, first_step)

    with monkeypatch.context() as patch, pytest.raises(common.RunError, match="at training step 3"):
        patch.setattr(nf, "run_epoch", poisoned_in_epoch_two)
        run_main(smoke, out)
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert saved["epoch"] == 1 and saved["curves"]["train_bpd"] == uninterrupted["curves"]["train_bpd"][:1]
    assert all(torch.isfinite(v).all() for v in saved["state"]["model"].values())
    assert not (out / "metrics.json").exists()

    resumed = run_main(smoke, out, "--resume")
    for name in ("train_bpd", "val_bpd"):
        assert resumed["curves"][name] == uninterrupted["curves"][name]
    assert resumed["test"] == uninterrupted["test"] and resumed["evaluation"] == uninterrupted["evaluation"]


def test_template_flag_trains_the_templates_way(smoke, monkeypatch):
    calls = {"mnist": [], "clip": []}
    mnist = nf.mnist
    monkeypatch.setattr(nf, "mnist", lambda *args, **kwargs: calls["mnist"].append(kwargs)
                        or mnist(*args, **kwargs))
    monkeypatch.setattr(nf, "clip_gradients", lambda *args: calls["clip"].append(args))
    out = smoke / "template"
    metrics = run_main(smoke, out, "--template")
    assert metrics["setting"] == nf.TEMPLATE
    assert calls == {"mnist": [{"batch_size": 128}], "clip": []}
    group = torch.load(out / "checkpoint.pt", weights_only=False)["state"]["optimizer"]["param_groups"][0]
    assert group["lr"] == 1e-3 and group["weight_decay"] == 0  # constant, plain Adam


def test_a_corrupted_mnist_file_ends_in_one_line(smoke):
    path = corrupt(smoke, "t10k-images-idx3-ubyte")
    with pytest.raises(SystemExit) as exit_info:
        common.cli(lambda: nf.main(argv(smoke, smoke / "out")))
    assert_one_line_error(exit_info, str(path), "corrupted or truncated")


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--epochs", "1.5")])
def test_bad_values_are_argparse_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        nf.parse_args([flag, value])
    assert exit_info.value.code == 2
    assert "--epochs" in capsys.readouterr().err


def test_defaults_and_removed_flags():
    args = nf.parse_args([])
    assert (args.epochs, args.out) == (40, "results/nf")
    for removed in ("--lr", "--batch-size", "--eval-samples", "--weight-decay", "--warmup", "--clip"):
        with pytest.raises(SystemExit):
            nf.parse_args([removed, "1"])
