"""The RealNVP flow against known answers: invertibility, exact log-determinants, closed-form
likelihoods of the identity flow, the learning-rate schedule and the training loop, and its command
line end to end on a small fake MNIST folder. The convolutional couplings and the variational
dequantization of extensions.nf_couplings are tested in test_nf_couplings.py."""

import dataclasses
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

import a3_nf_template as nf
import harness
from datasets.loader import TensorLoader

ALPHA = nf.Model.ALPHA
SMALL = 16  # hidden width of the MLPs of the tests that train or differentiate whole models


def perturb(module, seed=0, std=0.05):
    """Re-initialise the last layer of every coupling's network so that the flow is far from the
    identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for coupling in module.modules():
            if isinstance(coupling, nf.Coupling):
                last = [layer for layer in coupling.nn.modules() if hasattr(layer, "weight")][-1]
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


def round_trip_errors(module, z):
    """(relative error of reverse(forward(z)), |ldj_forward + ldj_reverse| relative to |ldj_forward|)."""
    zeros = torch.zeros(len(z))
    with torch.no_grad():
        forward, ldj_forward = module(z, zeros)
        back, ldj_reverse = module(forward, zeros, reverse=True)
    scale = ldj_forward.abs().clamp(min=1.0)
    return (mean_relative_error(back, z), ((ldj_forward + ldj_reverse).abs() / scale).max().item(),
            forward, ldj_forward)


def check_reverse_undoes_forward(module, perturbed):
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


def check_the_courses_unit_test_contract(module):
    """The course's check: forward, then reverse with the forward's log-determinant, gives the input
    back and a log-determinant of zero (here on a flow far from the identity)."""
    perturb(module, seed=1)
    x = torch.randn(8, 784)
    with torch.no_grad():
        z, ldj = module(x, torch.zeros(8))
        x_back, ldj_back = module(z, ldj, reverse=True)
    assert ldj.abs().max() > 1.0 and (z - x).abs().mean() > 0.05  # not a trivial round trip
    torch.testing.assert_close(x_back, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ldj_back, torch.zeros(8), rtol=0, atol=1e-4)


def check_log_determinant_matches_the_full_jacobian(model):
    """The model's log-determinant of x -> z against slogdet of autograd's 784 x 784 Jacobian, in
    float64, and forward() against the change of variables log N(z) + log |det dz/dx|."""
    model = perturb(model, std=0.2).double()
    pixels = pixel_images(3, seed=2).double()
    noise_seed = 5

    def to_latent(x):
        y, ldj = model.logit_normalize(x, torch.zeros(len(x), dtype=x.dtype))
        return model.flow(y, ldj)

    x, _ = model.dequantize(pixels, torch.zeros(3), generator=torch.Generator().manual_seed(noise_seed))
    with torch.no_grad():
        z, ldj = to_latent(x)
        log_px = model(pixels, generator=torch.Generator().manual_seed(noise_seed))
        identity = nf.Model([784], n_hidden=SMALL).double()
        identity_ldj = identity.logit_normalize(x, torch.zeros(3, dtype=x.dtype))[1]
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


def check_importance_weighted_bpd(model):
    """At S = 1 the importance-weighted bits/dim is the evaluation's one-sample bound; at S = 4 it
    is -log mean exp of the draws' log-likelihoods, below their average (Jensen)."""
    model = perturb(model, std=0.1).eval()
    loader = TensorLoader(pixel_images(6, seed=7), torch.zeros(6), batch_size=3)
    bound = nf.epoch_iter(model, loader, None)
    assert nf.importance_weighted_bpd(model, loader, samples=1) == pytest.approx(bound, rel=1e-7)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        draws = [torch.stack([model(imgs, generator=generator) for _ in range(4)]) for imgs, _ in loader]
    log_w = torch.cat(draws, dim=1)
    expected = nf.bits_per_dim(torch.logsumexp(log_w, 0) - math.log(4)).mean().item()
    estimate = nf.importance_weighted_bpd(model, loader, samples=4)
    assert estimate == pytest.approx(expected, rel=1e-6)  # float32 sums in another order
    assert estimate < nf.bits_per_dim(log_w).mean().item() - 1e-4


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


def test_a_network_handed_in_replaces_the_mlp_and_gets_the_masked_input_and_the_keywords():
    """The seam: ``Coupling(net=...)`` uses the given network on mask * z, passing it the keyword
    arguments of forward; ``Flow(net=factory)`` builds one per coupling from that coupling's mask."""
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self, mask):
            super().__init__()
            self.built_for = mask

        def forward(self, masked, **context):
            seen.append((masked, context))
            return torch.zeros(len(masked), 2 * 784)

    flow = nf.Flow([784], n_flows=2, net=Recorder)
    mask = nf.get_mask()
    for layer, layer_mask in zip(flow.layers, [mask, 1 - mask] * 2, strict=True):
        assert torch.equal(layer.nn.built_for, layer_mask)
    assert all(torch.equal(layer.mask, layer.nn.built_for) for layer in flow.layers)
    assert not any(isinstance(m, torch.nn.Linear) for m in flow.modules())
    z = torch.randn(3, 784)
    out, ldj = flow(z, torch.zeros(3), reverse=True, context="image")
    assert torch.equal(out, z) and not ldj.any()
    assert len(seen) == 4 and all(context == {"context": "image"} for _, context in seen)
    assert torch.equal(seen[0][0], z * (1 - mask))  # reverse: the last coupling, the complement, first


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


BUILDS = {"coupling": lambda: nf.Coupling(c_in=784, mask=nf.get_mask()),
          "flow": lambda: nf.Flow([784], n_flows=2)}


@pytest.mark.parametrize("build", BUILDS.values(), ids=BUILDS.keys())
@pytest.mark.parametrize("perturbed", [False, True], ids=["identity", "perturbed"])
def test_reverse_undoes_forward(build, perturbed):
    torch.manual_seed(0)
    check_reverse_undoes_forward(build(), perturbed)


@pytest.mark.parametrize("build", BUILDS.values(), ids=BUILDS.keys())
def test_the_courses_unit_test_contract(build):
    torch.manual_seed(1)
    check_the_courses_unit_test_contract(build())


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


# ---------------------------------------------------------------- dequantization and normalisation

def test_uniform_dequantization_adds_the_noise_keeps_the_log_determinant_and_floors_back():
    model = nf.Model([784], n_hidden=SMALL)
    pixels, ldj = pixel_images(16), torch.randn(16)
    x, ldj_out = model.dequantize(pixels, ldj, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, pixels + torch.rand(pixels.shape, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(ldj_out, ldj)
    back, ldj_back = model.dequantize(x, ldj, reverse=True)
    assert torch.equal(back, pixels) and torch.equal(ldj_back, ldj)
    outside, _ = model.dequantize(torch.tensor([[-3.0, -0.2, 255.5, 256.2, 300.0]]), ldj[:1], reverse=True)
    assert outside.tolist() == [[0, 0, 255, 255, 255]]


def test_logit_normalize_round_trip_on_dequantized_data():
    model = nf.Model([784], n_hidden=SMALL)
    zeros = torch.zeros(16)
    x, _ = model.dequantize(pixel_images(16), zeros, generator=torch.Generator().manual_seed(1))
    assert x.min() >= 0 and x.max() < 256
    y, ldj_forward = model.logit_normalize(x, zeros)
    assert torch.isfinite(y).all()
    back, ldj_reverse = model.logit_normalize(y, zeros, reverse=True)
    assert mean_relative_error(back, x) < 1e-5
    assert ((ldj_forward + ldj_reverse).abs() / ldj_forward.abs()).max() < 1e-5


# ---------------------------------------------------------------- exact log-likelihoods

def test_log_determinant_matches_the_full_jacobian():
    torch.manual_seed(0)
    check_log_determinant_matches_the_full_jacobian(nf.Model([784], n_hidden=SMALL))


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


def test_sampling_runs_the_three_layers_backwards_to_pixel_values():
    model = nf.Model([784])
    samples = model.sample(32, torch.Generator().manual_seed(0))
    assert samples.shape == (32, 784)
    assert torch.equal(samples, samples.floor()) and samples.min() >= 0 and samples.max() <= 255

    # With identity couplings a sample is the floored inverse logit transform of the prior draw.
    z = torch.randn(32, 784, generator=torch.Generator().manual_seed(0))
    continuous, _ = model.logit_normalize(z, torch.zeros(32), reverse=True)
    expected = (expit(z.double().numpy()) - ALPHA / 2) / (1 - ALPHA) * 256
    np.testing.assert_allclose(continuous.double().numpy(), expected, rtol=1e-5, atol=1e-3)
    assert torch.equal(samples, continuous.clamp(0, 256 - 1e-3).floor())

    perturbed = perturb(nf.Model([784]), std=0.2).sample(32, torch.Generator().manual_seed(0))
    assert torch.equal(perturbed, perturbed.floor()) and perturbed.min() >= 0 and perturbed.max() <= 255
    assert (perturbed - samples).abs().mean() > 1


def test_importance_weighted_bpd_with_one_sample_is_the_bound_and_more_samples_tighten_it():
    torch.manual_seed(0)
    check_importance_weighted_bpd(nf.Model([784], n_hidden=SMALL))


# ---------------------------------------------------------------- settings and learning rate

def test_settings_default_and_the_templates():
    assert dataclasses.asdict(nf.DEFAULT) == {
        "epochs": 40, "batch_size": 128, "lr": 5e-4, "warmup_epochs": 1, "cosine_decay": True, "clip": 100.0,
        "n_flows": 4, "n_hidden": 1024}
    assert harness.settings.differences(nf.TEMPLATE, nf.DEFAULT) == {
        "lr": 1e-3, "warmup_epochs": 0, "cosine_decay": False, "clip": None}


def test_settings_build_the_model_they_name():
    model = nf.build_model(dataclasses.replace(nf.DEFAULT, n_flows=1, n_hidden=8))
    assert len(model.flow.layers) == 2
    assert [layer.nn[0].out_features for layer in model.flow.layers] == [8, 8]
    assert isinstance(model.dequantizer, nf.UniformDequantization)
    assert sum(p.numel() for p in nf.build_model(nf.DEFAULT).parameters()) == \
        sum(p.numel() for p in nf.Model([784]).parameters())


def test_learning_rate_warms_up_over_the_first_epoch_then_decays_along_a_half_cosine():
    settings, lr = nf.DEFAULT, nf.DEFAULT.lr
    steps, total = 10, 400  # 10 steps per epoch, 40 epochs

    def rate(step):
        return nf.get_lr(step, steps, settings)

    assert [rate(step) for step in (0, 4, 9)] == pytest.approx([lr / 10, lr / 2, lr])
    assert rate(10) == lr  # the cosine starts at its top
    assert rate(10 + 195) == pytest.approx(lr / 2)  # halfway through the 390 decaying steps
    assert rate(total - 1) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 389 / 390)))
    assert rate(total) == pytest.approx(0, abs=1e-20)
    decay = [rate(step) for step in range(10, total)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))


def test_learning_rate_without_warm_up_or_decay():
    assert {nf.get_lr(step, 10, nf.TEMPLATE) for step in range(400)} == {1e-3}
    cosine_only = dataclasses.replace(nf.DEFAULT, epochs=10, warmup_epochs=0)
    assert nf.get_lr(0, 10, cosine_only) == nf.DEFAULT.lr
    assert nf.get_lr(50, 10, cosine_only) == pytest.approx(nf.DEFAULT.lr / 2)


def old_get_lr(step, total_steps, setting, steps_per_epoch):
    """The schedule as the script computed it before its settings were a dataclass (commit bda58df)."""
    warmup = setting["warmup_epochs"] * steps_per_epoch
    if step < warmup:
        return setting["lr"] * (step + 1) / warmup
    if not setting["cosine_decay"]:
        return setting["lr"]
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return setting["lr"] * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("settings", [nf.DEFAULT, nf.TEMPLATE, dataclasses.replace(nf.DEFAULT, epochs=3),
                                      dataclasses.replace(nf.DEFAULT, epochs=2, warmup_epochs=0.25,
                                                          lr=1e-3, batch_size=128)],
                         ids=["default", "template", "3 epochs", "quarter-epoch warm-up"])
def test_learning_rate_is_the_old_schedule_at_every_step(settings):
    for steps_per_epoch in (1, 7, 157):
        old = {key: getattr(settings, key) for key in ("lr", "warmup_epochs", "cosine_decay")}
        total = settings.epochs * steps_per_epoch
        assert [nf.get_lr(step, steps_per_epoch, settings) for step in range(total + 1)] == \
            [old_get_lr(step, total, old, steps_per_epoch) for step in range(total + 1)]


# ---------------------------------------------------------------- the epoch loop

def test_eval_epoch_is_the_deterministic_average_bpd_without_gradients(monkeypatch):
    model = perturb(nf.Model([784], n_hidden=SMALL)).eval()
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


def constant(lr, clip=None):
    """Settings of a constant learning rate ``lr``."""
    return dataclasses.replace(nf.TEMPLATE, lr=lr, clip=clip)


def test_train_epoch_averages_bpd_before_each_step_and_learns():
    torch.manual_seed(0)
    model = nf.Model([784], n_hidden=SMALL).train()
    images = pixel_images(8, seed=5)
    loader = TensorLoader(images, torch.zeros(8), batch_size=8)

    # A zero learning rate: the returned value is the bpd of the batch under the global RNG's noise.
    torch.manual_seed(1)
    with torch.no_grad():
        expected = nf.bits_per_dim(model(images)).mean().item()
    torch.manual_seed(1)
    frozen = nf.epoch_iter(model, loader, torch.optim.SGD(model.parameters(), lr=0.0))
    assert frozen == pytest.approx(expected, rel=1e-6)
    assert all(p.grad is not None for p in model.parameters())

    model.eval()
    before = nf.epoch_iter(model, loader, None)
    model.train()
    optimizer = torch.optim.Adam(model.parameters())
    for epoch in range(10):
        nf.epoch_iter(model, loader, optimizer, constant(1e-3, clip=100.0), first_step=epoch)
    model.eval()
    assert nf.epoch_iter(model, loader, None) < before - 0.01


@pytest.fixture
def clipped(monkeypatch):
    """The max_norm of every torch.nn.utils.clip_grad_norm_ call, which still clips."""
    calls = []
    clip_grad_norm_ = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda parameters, max_norm, **kwargs:
                        calls.append(max_norm) or clip_grad_norm_(parameters, max_norm, **kwargs))
    return calls


def test_each_training_step_takes_the_learning_rate_of_its_global_step(clipped):
    model = nf.Model([784], n_hidden=SMALL).train()
    loader = TensorLoader(pixel_images(12, seed=6), torch.zeros(12), batch_size=4)  # 3 steps an epoch
    optimizer = RecordingSGD(model.parameters(), lr=1.0)
    settings = dataclasses.replace(nf.DEFAULT, epochs=4, lr=1e-3, clip=5.0)
    nf.epoch_iter(model, loader, optimizer, settings, first_step=2)
    assert optimizer.rates == [nf.get_lr(step, 3, settings) for step in (2, 3, 4)]
    assert optimizer.rates == pytest.approx([1e-3, 1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi / 9))])
    assert clipped == [5.0] * 3
    nf.epoch_iter(model, loader, optimizer, dataclasses.replace(settings, clip=None))
    assert optimizer.rates[3:] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])
    assert clipped == [5.0] * 3  # clip None: clip_grad_norm_ is not called


def test_training_without_settings_keeps_the_optimizers_learning_rate_and_does_not_clip(clipped):
    model = nf.Model([784], n_hidden=SMALL).train()
    optimizer = RecordingSGD(model.parameters(), lr=1e-3)
    nf.epoch_iter(model, TensorLoader(pixel_images(4), torch.zeros(4), batch_size=4), optimizer)
    assert optimizer.rates == [1e-3] and clipped == []


def test_a_nan_loss_stops_training_before_the_step():
    model = nf.Model([784], n_hidden=SMALL).train()
    with torch.no_grad():
        model.flow.layers[0].nn[-1].bias.fill_(math.nan)
    optimizer = RecordingSGD(model.parameters(), lr=0.1)
    with pytest.raises(harness.RunError, match="loss became nan at training step 4"):
        nf.epoch_iter(model, TensorLoader(pixel_images(4), torch.zeros(4), batch_size=4), optimizer,
                      constant(0.1), first_step=4)
    assert optimizer.rates == []


def old_clip_gradients(model, max_norm):
    """The script's hand-written clipping before it used clip_grad_norm_ (commit bda58df): no
    scaling pass at all when the norm is below ``max_norm``."""
    parameters = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if norm > max_norm:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)


@pytest.mark.parametrize("clip", [0.05, 1e4], ids=["clipping", "below the norm"])
def test_clip_grad_norm_steps_exactly_as_the_old_clipping(clip):
    """A training step of epoch_iter, clipped by clip_grad_norm_, moves every parameter bit for bit
    as the old hand-written clipping did, whether the gradient is scaled down or left alone."""
    pixels = pixel_images(8, seed=3)
    images = TensorLoader(pixels, torch.zeros(8), batch_size=8)
    torch.manual_seed(0)
    ours = perturb(nf.Model([784], n_hidden=SMALL)).train()
    theirs = perturb(nf.Model([784], n_hidden=SMALL))
    theirs.load_state_dict(ours.state_dict())
    settings = constant(0.1, clip=clip)
    torch.manual_seed(1)
    nf.epoch_iter(ours, images, torch.optim.SGD(ours.parameters(), lr=0.1), settings)

    torch.manual_seed(1)
    loss = nf.bits_per_dim(theirs(pixels)).mean()
    loss.backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in theirs.parameters()]).item()
    assert (norm > clip) == (clip < 1)  # the two cases are the two branches
    old_clip_gradients(theirs, clip)
    torch.optim.SGD(theirs.parameters(), lr=0.1).step()
    for mine, reference in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(mine, reference)
    if clip < 1:
        clipped_norm = torch.nn.utils.get_total_norm([p.grad for p in ours.parameters()])
        assert clipped_norm == pytest.approx(clip, rel=1e-5)


def test_fused_adam_trains_as_plain_adam():
    """The script's fused Adam is a speed-up only: two steps of epoch_iter, clipping included, give
    the parameters and the bpd of torch's plain Adam."""
    loader = TensorLoader(pixel_images(16, seed=8), torch.zeros(16), batch_size=8)
    models, values = [], []
    for fused in (True, False):
        torch.manual_seed(0)
        model = perturb(nf.Model([784], n_hidden=SMALL)).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=nf.DEFAULT.lr, fused=fused)
        torch.manual_seed(1)
        values.append(nf.epoch_iter(model, loader, optimizer, constant(nf.DEFAULT.lr, clip=1.0)))
        models.append(model)
    for fused, plain in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(fused, plain, rtol=0, atol=1e-6)
    assert values[0] == pytest.approx(values[1], rel=1e-6)


def test_run_epoch_trains_in_the_given_precision_and_validates_in_fp32():
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    model = nf.Model([784], n_hidden=SMALL)
    seen = []
    record_precision(model.flow.layers[0].nn[0], seen)
    train = TensorLoader(pixel_images(8), torch.zeros(8), batch_size=4)
    val = TensorLoader(pixel_images(4, seed=1), torch.zeros(4), batch_size=4)
    nf.run_epoch(model, (train, val), torch.optim.SGD(model.parameters(), lr=0.0), precision="bf16")
    assert seen == [(True, "bf16"), (True, "bf16"), (False, "ieee")]
    assert torch.backends.mkldnn.matmul.fp32_precision == "ieee" and not model.training
    seen.clear()
    nf.run_epoch(model, (train, val), torch.optim.SGD(model.parameters(), lr=0.0))
    assert seen == [(True, "ieee"), (True, "ieee"), (False, "ieee")]


@needs_amx
def test_bf16_training_step_keeps_the_loss_and_gradient_of_fp32():
    """On a fixed seed and batch, the full-size model's bpd and gradient under bf16 training matmuls
    agree with fp32, and the log-likelihood stays fp32."""
    images = pixel_images(16, seed=6)
    results = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(1)
        model = perturb(nf.Model([784]), std=0.01).train()
        with harness.matmul_precision(precision):
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
    monkeypatch.setattr(harness, "save_curves", lambda curves, stem, **kwargs: calls.append(kwargs))
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


def test_sample_images_are_the_models_samples_as_seeded_pixels_in_chunks(monkeypatch):
    model = perturb(nf.Model([784], n_hidden=SMALL), std=0.2)
    images = nf.sample_images(model, 12, seed=3)
    assert torch.equal(images, model.sample(12, torch.Generator().manual_seed(3)) / 255)
    assert torch.equal(images * 255, (images * 255).round()) and images.min() >= 0 and images.max() <= 1
    monkeypatch.setattr(nf.Model, "sample", lambda self, n, generator: torch.full((n, 784), float(n)))
    assert (nf.sample_images(model, 2500)[:, 0] * 255).round().unique().tolist() == [500, 1000]


# ---------------------------------------------------------------- command line

SMALL_RUN = ("--set", "batch_size=32", "--set", f"n_hidden={SMALL}")  # 3 steps per epoch on 80 images


@pytest.fixture
def smoke(fake_mnist, small_splits, monkeypatch):
    """The script on the fake MNIST folder with its real data, evaluation and classifier code, and
    100 evaluation samples; ``argv`` adds small couplings and batches of 32."""
    monkeypatch.setattr(nf, "EVALUATION_SAMPLES", 100)
    return fake_mnist.root


def argv(root, out, *flags):
    return ["--epochs", "2", *SMALL_RUN, "--device", "cpu", "--data_root", str(root), "--out", str(out),
            *flags]


def run_main(root, out, *flags):
    nf.main(argv(root, out, *flags))
    return json.loads((out / "metrics.json").read_text())


def test_smoke_run_writes_every_output_and_resuming_it_reproduces_the_numbers(smoke, clipped, capsys):
    out = smoke / "nf"
    metrics = run_main(smoke, out, "--resume")

    expected = {f"{stem}.{ext}" for stem in nf.FIGURES.values() for ext in ("png", "pdf")}
    assert {p.name for p in out.iterdir()} == expected | {"epochs", "metrics.json", "checkpoint.pt",
                                                          "weights.pt", "train.log"}
    assert {p.name for p in (out / "epochs").iterdir()} == {f"epoch_0{e}.{ext}" for e in (1, 2)
                                                            for ext in ("png", "pdf")}
    assert Image.open(out / "epochs" / "epoch_02.png").size == Image.open(out / "samples_end.png").size

    settings = dataclasses.replace(nf.DEFAULT, epochs=2, batch_size=32, n_hidden=SMALL)
    assert metrics["settings"] == dataclasses.asdict(settings) and metrics["epochs_completed"] == 2
    assert metrics["milestones"] == {"halfway": 1} and metrics["figures"] == nf.FIGURES
    curves = metrics["curves"]
    assert set(curves) == {"train_bpd", "val_bpd", "wall_time_s"}
    assert all(len(values) == 2 for values in curves.values())
    assert 0 < curves["wall_time_s"][0] < curves["wall_time_s"][1] == metrics["wall_time_s"]
    assert metrics["images_per_s"] == pytest.approx(2 * 80 / metrics["wall_time_s"])
    assert metrics["n_params"] == sum(p.numel() for p in nf.Model([784], n_hidden=SMALL).parameters())
    assert all(4 < bpd < 12 for bpd in curves["train_bpd"] + curves["val_bpd"])
    assert clipped == [100.0] * 6  # every step of both epochs

    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    group = saved["state"]["optimizer"]["param_groups"][0]
    # The last of 6 steps: 3 warm-up steps, then 2/3 of the way down the half cosine.
    assert group["fused"] and group["weight_decay"] == 0
    assert group["lr"] == nf.get_lr(5, 3, settings) == pytest.approx(settings.lr / 4)

    # The test bpd is the deterministic evaluation pass of the saved model over the test images.
    model = nf.build_model(settings)
    model.load_state_dict(saved["state"]["model"])
    test_loader = nf.mnist(smoke, batch_size=32)[2]
    assert metrics["test"]["bpd"] == pytest.approx(nf.epoch_iter(model.eval(), test_loader, None), rel=1e-6)
    assert metrics["test"]["noise_samples"] == nf.NOISE_SAMPLES
    assert metrics["evaluation"]["reference"] == "test" and metrics["evaluation"]["n_samples"] == 100
    sampled = nf.load_sampler(out / "checkpoint.pt")(20)
    assert sampled.shape == (20, 784) and torch.equal(sampled * 255, (sampled * 255).round())
    assert torch.equal(sampled, nf.sample_images(model, 20))

    assert_resume_keeps_the_run(lambda: run_main(smoke, out, "--resume"), out, metrics, capsys)
    assert_refused_in_one_line(lambda: nf.main(argv(smoke, out, "--resume", "--epochs", "3")),
                               "epochs=2 (asked: 3)")
    assert_rebuild_reproduces_the_run(lambda: run_main(smoke, out, "--from_weights"), out, metrics)


def test_resume_after_a_nan_matches_an_uninterrupted_run(smoke, monkeypatch):
    """The crash in epoch 2 keeps the checkpoint of epoch 1; resuming it continues the schedule from
    global step 3 and trains what the uninterrupted run trained."""
    uninterrupted = run_main(smoke, smoke / "straight")
    out = smoke / "resumed"
    run_epoch = nf.run_epoch

    def poisoned_in_epoch_two(model, data, optimizer, settings=None, first_step=0, precision="fp32"):
        if first_step == 3:
            with torch.no_grad():
                model.flow.layers[0].nn[-1].bias.fill_(math.nan)
        return run_epoch(model, data, optimizer, settings, first_step, precision)

    with monkeypatch.context() as patch, pytest.raises(harness.RunError, match="at training step 3"):
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


def test_template_flag_trains_the_templates_way(smoke, monkeypatch, clipped):
    calls = []
    mnist = nf.mnist
    monkeypatch.setattr(nf, "mnist", lambda *args, **kwargs: calls.append(kwargs) or mnist(*args, **kwargs))
    out = smoke / "template"
    nf.main(["--epochs", "2", "--set", f"n_hidden={SMALL}", "--device", "cpu", "--data_root", str(smoke),
             "--out", str(out), "--template"])
    metrics = json.loads((out / "metrics.json").read_text())
    template = dataclasses.replace(nf.TEMPLATE, epochs=2, n_hidden=SMALL)
    assert metrics["settings"] == dataclasses.asdict(template)
    assert calls == [{"batch_size": 128}] and clipped == []
    group = torch.load(out / "checkpoint.pt", weights_only=False)["state"]["optimizer"]["param_groups"][0]
    assert group["lr"] == 1e-3 and group["weight_decay"] == 0  # constant, plain Adam


def test_a_set_override_reaches_the_model(smoke):
    out = smoke / "one_pair"
    metrics = run_main(smoke, out, "--set", "n_flows=1", "--set", "clip=none")
    assert metrics["settings"]["n_flows"] == 1 and metrics["settings"]["clip"] is None
    weights = torch.load(out / "weights.pt", weights_only=True)["model"]
    assert {key.split(".")[2] for key in weights} == {"0", "1"}  # two couplings
    assert weights["flow.layers.0.nn.0.weight"].shape == (SMALL, 784)


def test_a_corrupted_mnist_file_ends_in_one_line(smoke):
    path = corrupt(smoke, "t10k-images-idx3-ubyte")
    with pytest.raises(SystemExit) as exit_info:
        harness.cli(lambda: nf.main(argv(smoke, smoke / "out")))
    assert_one_line_error(exit_info, str(path), "corrupted or truncated")


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--epochs", "1.5")])
def test_bad_values_are_argparse_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        nf.parse_args([flag, value])
    assert exit_info.value.code == 2
    assert "--epochs" in capsys.readouterr().err


@pytest.mark.parametrize("assignment, fragment", [("epochs=0", "epochs must be positive"),
                                                  ("n_hidden=wide", "n_hidden is an int"),
                                                  ("clip=0", "clip must be positive"),
                                                  ("coupling=conv", "no setting 'coupling'")])
def test_bad_settings_are_one_line_errors(assignment, fragment, tmp_path):
    assert_refused_in_one_line(lambda: nf.main(["--set", assignment, "--out", str(tmp_path / "out")]),
                               fragment)
    assert not (tmp_path / "out").exists()  # refused before the run starts


def test_defaults_and_removed_flags():
    args = nf.parse_args([])
    assert (args.epochs, args.out, args.overrides) == (None, "results/nf", [])
    assert nf.parse_args(["--epochs", "3", "--set", "lr=1e-3"]).overrides == ["epochs=3", "lr=1e-3"]
    for removed in ("--lr", "--batch-size", "--eval-samples", "--weight-decay", "--warmup", "--clip",
                    "--coupling", "--dequantization"):
        with pytest.raises(SystemExit):
            nf.parse_args([removed, "1"])


def test_a_flow_handed_to_the_model_replaces_the_templates():
    flow = nf.Flow([nf.N_PIXELS], n_flows=1, n_hidden=8)
    model = nf.Model([nf.N_PIXELS], flow=flow)
    assert model.flow is flow and sum(p.numel() for p in model.parameters()) == \
        sum(p.numel() for p in flow.parameters())
    x = torch.randint(0, 256, (3, nf.N_PIXELS)).float()
    assert model(x).shape == (3,) and model.sample(2).shape == (2, nf.N_PIXELS)
