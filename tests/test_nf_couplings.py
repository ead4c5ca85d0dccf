"""extensions.nf_couplings against known answers: the convolutional coupling networks keep the
couplings' invertibility and exact log-determinants, the variational dequantizer's log q(u | x) is
its Jacobian's and it starts as the uniform one, and the module's command line end to end."""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    REPO,
    assert_rebuild_reproduces_the_run,
    assert_refused_in_one_line,
    assert_resume_keeps_the_run,
)
from scipy import stats
from scipy.special import expit, log_ndtr, logit
from test_nf import (
    check_importance_weighted_bpd,
    check_log_determinant_matches_the_full_jacobian,
    check_reverse_undoes_forward,
    check_the_courses_unit_test_contract,
    perturb,
    pixel_images,
)

import a3_nf_template as nf
from extensions import nf_couplings as nfc


def conv_model(**changes):
    return nfc.build_model(dataclasses.replace(nfc.DEFAULT, **changes))


# ---------------------------------------------------------------- settings

def test_settings_are_the_answers_with_the_conv_training():
    assert dataclasses.asdict(nfc.DEFAULT) == {
        **dataclasses.asdict(nf.DEFAULT), "batch_size": 128, "lr": 1e-3, "warmup_epochs": 0.25, "epochs": 12,
        "coupling": "conv", "dequantization": "uniform", "channels": 32, "blocks": 2}
    assert dataclasses.asdict(nfc.TEMPLATE) == {
        **dataclasses.asdict(nf.TEMPLATE), "coupling": "conv", "dequantization": "uniform", "channels": 32,
        "blocks": 2}


def test_settings_build_the_model_they_name():
    model = conv_model(channels=8, blocks=3)
    assert len(model.flow.layers) == 8
    assert all(isinstance(layer.nn, nfc.ConvNet) for layer in model.flow.layers)
    assert {(layer.nn.input.out_channels, len(layer.nn.blocks)) for layer in model.flow.layers} == {(8, 3)}
    assert isinstance(model.dequantizer, nf.UniformDequantization)
    mlp_variational = conv_model(coupling="mlp", dequantization="variational", n_flows=1, n_hidden=8)
    assert [layer.nn[0].out_features for layer in mlp_variational.flow.layers] == [8, 8]
    assert isinstance(mlp_variational.dequantizer, nfc.VariationalDequantization)


def test_the_committed_weights_still_load(tmp_path):
    """The state_dict keys of both convolutional-coupling runs of ``make extensions`` are those of
    their weights.pt."""
    for run, dequantization in (("nf_conv", "uniform"), ("nf_conv_variational", "variational")):
        path = REPO / "results" / "extensions" / run / "weights.pt"
        if not path.exists():
            pytest.skip(f"{path} is not here")
        weights = torch.load(path, weights_only=True)["model"]
        conv_model(dequantization=dequantization).load_state_dict(weights)


# ---------------------------------------------------------------- convolutional couplings

BUILDS = {"conv coupling": lambda: nf.Coupling(c_in=784, mask=nf.get_mask(), net=nfc.ConvNet(nf.get_mask())),
          "conv flow": lambda: nf.Flow([784], n_flows=2, net=nfc.ConvNet)}


@pytest.mark.parametrize("build", BUILDS.values(), ids=BUILDS.keys())
@pytest.mark.parametrize("perturbed", [False, True], ids=["identity", "perturbed"])
def test_reverse_undoes_forward(build, perturbed):
    torch.manual_seed(0)
    check_reverse_undoes_forward(build(), perturbed)


@pytest.mark.parametrize("build", BUILDS.values(), ids=BUILDS.keys())
def test_the_courses_unit_test_contract(build):
    torch.manual_seed(1)
    check_the_courses_unit_test_contract(build())


def test_conv_coupling_network_sees_the_masked_image_and_the_mask_and_starts_as_the_identity():
    mask = nf.get_mask()
    coupling = nf.Coupling(c_in=784, mask=mask, net=nfc.ConvNet(mask))
    assert coupling.nn.input.in_channels == 4 * 2  # masked image and mask, squeezed 2x2
    assert not coupling.nn.output.weight.any() and not coupling.nn.output.bias.any()
    assert "nn.mask" not in coupling.state_dict()  # the coupling's own mask, not saved twice
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

    # The mask channel is the coupling's: the complement's network sees another input.
    complement = nf.Coupling(c_in=784, mask=1 - mask, net=nfc.ConvNet(1 - mask))
    complement.nn.load_state_dict(coupling.nn.state_dict())
    assert not torch.equal(complement.nn(z * mask), coupling.nn(z * mask))


def test_conv_network_takes_a_context_image_as_extra_channels():
    mask = nf.get_mask()
    net = perturb(nf.Coupling(784, mask, net=nfc.ConvNet(mask, context_channels=1)), std=0.2).nn
    assert net.input.in_channels == 4 * 3
    z, context = torch.randn(2, 784), torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        out = net(z * mask, context=context)
        assert out.shape == (2, 2 * 784)
        assert not torch.equal(out, net(z * mask, context=torch.zeros_like(context)))


def test_log_determinant_matches_the_full_jacobian():
    torch.manual_seed(0)
    check_log_determinant_matches_the_full_jacobian(conv_model())


def test_conv_flow_has_under_one_percent_of_the_template_flows_parameters():
    n_params = [sum(p.numel() for p in model.parameters()) for model in
                (nf.Model([784]), conv_model(), conv_model(dequantization="variational"))]
    assert n_params[0] > 27e6
    assert n_params[1] < n_params[2] < 0.01 * n_params[0]


# ---------------------------------------------------------------- variational dequantization

def perturbed_dequantizer(seed=0):
    torch.manual_seed(seed)
    return perturb(nfc.VariationalDequantization(), seed=seed, std=0.2)


def test_variational_dequantization_log_density_matches_its_jacobian():
    """log q(u | x) = log Logistic(e) - log |det du/de|, with du/de from autograd (float64), for the
    logistic draw e the dequantizer makes from its generator; the layer adds u and subtracts log q."""
    dequantizer = perturbed_dequantizer().double()
    pixels = pixel_images(2, seed=4).double()
    context = (pixels / 255).view(-1, 1, 28, 28)
    with torch.no_grad():
        noise, log_q = dequantizer.noise(pixels, torch.Generator().manual_seed(9))
        x, ldj = dequantizer(pixels, torch.ones(2, dtype=torch.float64),
                             generator=torch.Generator().manual_seed(9))
    assert torch.equal(x, pixels + noise) and torch.equal(ldj, 1 - log_q)
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
    variational = conv_model(dequantization="variational")
    perturb(variational.flow, std=0.1)
    uniform = conv_model()
    uniform.flow.load_state_dict(variational.flow.state_dict())
    pixels = pixel_images(4, seed=5)
    with torch.no_grad():
        noise, log_q = variational.dequantizer.noise(pixels, torch.Generator().manual_seed(3))
        expected = torch.rand(pixels.shape, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(noise, expected, rtol=0, atol=1e-6)
        assert not log_q.any()
        bound = variational(pixels, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(bound, uniform(pixels, generator=torch.Generator().manual_seed(3)))
        perturb(variational.dequantizer, std=0.2)
        trained = variational(pixels, generator=torch.Generator().manual_seed(3))
    assert (trained - bound).abs().min() > 1


def log_cell_mass(pixels):
    """log P(x) [B] of the flow with identity couplings: its density of x + u is, per pixel, the
    logit-normal density of the logit transform, whose mass on the cell [v, v + 1) is
    Phi(z(v + 1)) - Phi(z(v)), z(y) = logit(alpha/2 + (1 - alpha) y / 256) (on the side of the median
    where the normal's tail is computed without cancellation)."""
    alpha = nf.Model.ALPHA
    low, high = (logit(alpha / 2 + (1 - alpha) * y / 256) for y in (pixels, pixels + 1.0))
    upper = low > 0
    small = np.where(upper, log_ndtr(-high), log_ndtr(low))
    large = np.where(upper, log_ndtr(-low), log_ndtr(high))
    return (large + np.log1p(-np.exp(small - large))).sum(1)


def factorised_bound_per_pixel_value(log_scale, shift, with_log_q=True):
    """E_q[log p(v + u) - log q(u)] for each pixel value v = 0..255 by quadrature, for the identity
    flow's density and u = sigmoid(exp(log_scale) e + shift), e ~ Logistic(0, 1):
    log q(u) = log Logistic(e) - log_scale - log sigmoid'(g) at g = exp(log_scale) e + shift."""
    alpha = nf.Model.ALPHA
    e = np.linspace(-40, 40, 40_001)
    g = np.exp(log_scale) * e + shift
    p = alpha / 2 + (1 - alpha) * (np.arange(256.0)[:, None] + expit(g)) / 256
    log_p = stats.norm.logpdf(logit(p)) + np.log((1 - alpha) / 256) - np.log(p) - np.log1p(-p)
    log_q = stats.logistic.logpdf(e) - log_scale - stats.logistic.logpdf(g)
    return np.trapezoid(stats.logistic.pdf(e) * ((log_p - log_q) if with_log_q else log_p), e, axis=1)


def test_variational_bound_is_its_quadrature_and_stays_below_the_discrete_log_likelihood():
    """End to end through the model: with identity couplings in the flow, log P(x) has a closed form
    (``log_cell_mass``). A dequantizer whose networks output constants (zero weights; biases: raw
    log-scale s, translation t) draws every u_i = sigmoid(exp(tanh s) e_i + t) independently, so the
    bound E_q[log p(x + u) - log q(u | x)] is a sum of 1-D integrals. The model's mean over draws must
    be that quadrature, and below log P(x) (Jensen). This q leans to the denser end of the cells of
    these dark pixels, where E_q[log p(x + u)] alone, without -log q, is above log P(x)."""
    s, t = -0.5, 2.0
    model = conv_model(dequantization="variational", channels=4, blocks=1, n_flows=1).double()
    with torch.no_grad():
        for coupling in model.dequantizer.flow.layers:
            coupling.nn.output.bias.copy_(torch.tensor([s] * 4 + [t] * 4))  # 4 log-scales, 4 translations
    pixels = (pixel_images(2, seed=8) * 100 // 255).double()  # pixel values 0..100
    repeats = 200
    torch.manual_seed(0)
    with torch.no_grad():
        draws = model(pixels.repeat(repeats, 1)).view(repeats, 2).numpy()
    mean, error = draws.mean(0), draws.std(0) / math.sqrt(repeats)
    values = pixels.long().numpy()
    bound = factorised_bound_per_pixel_value(math.tanh(s), t)[values].sum(1)
    without_log_q = factorised_bound_per_pixel_value(math.tanh(s), t, with_log_q=False)[values].sum(1)
    log_mass = log_cell_mass(pixels.numpy())
    assert (np.abs(mean - bound) < 4 * error).all(), (mean, bound, error)
    assert (mean < log_mass).all() and (bound < log_mass).all()
    assert (without_log_q > log_mass + 10).all()  # what the check guards against


def test_variational_dequantization_floors_back_to_the_pixels():
    dequantizer = perturbed_dequantizer()
    pixels, ldj = pixel_images(4, seed=6), torch.randn(4)
    with torch.no_grad():
        x, _ = dequantizer(pixels, ldj, generator=torch.Generator().manual_seed(2))
    back, ldj_back = dequantizer(x, ldj, reverse=True)
    assert torch.equal(ldj_back, ldj)
    # Back to the pixel, but where float32 rounds x + u up to the cube's far face (u near 1).
    off = back != pixels
    assert torch.equal(x[off] - pixels[off], torch.ones(int(off.sum()))) and off.float().mean() < 0.01
    samples = conv_model(dequantization="variational").sample(4, torch.Generator().manual_seed(0))
    assert torch.equal(samples, samples.floor()) and samples.min() >= 0 and samples.max() <= 255


@pytest.mark.parametrize("dequantization", ["uniform", "variational"])
def test_importance_weighted_bpd_with_one_sample_is_the_bound_and_more_samples_tighten_it(dequantization):
    torch.manual_seed(0)
    check_importance_weighted_bpd(conv_model(dequantization=dequantization))


# ---------------------------------------------------------------- command line

@pytest.fixture
def smoke(fake_mnist, small_splits, monkeypatch):
    monkeypatch.setattr(nf, "EVALUATION_SAMPLES", 100)
    monkeypatch.setattr(nf, "NOISE_SAMPLES", 3)
    return fake_mnist.root


def argv(root, out, *flags):
    return ["--epochs", "2", "--set", "batch_size=32", "--device", "cpu", "--data_root", str(root),
            "--out", str(out), *flags]


def run_main(root, out, *flags):
    nfc.main(argv(root, out, *flags))
    return json.loads((out / "metrics.json").read_text())


def test_conv_flow_with_variational_dequantization_end_to_end(smoke, capsys):
    """--set dequantization=variational trains the conv flow with the module's settings, reports both
    test estimates, samples through load_sampler, resumes and rebuilds from its weights with the same
    numbers."""
    out = smoke / "conv"
    flags = ("--set", "dequantization=variational")
    metrics = run_main(smoke, out, *flags)
    settings = dataclasses.replace(nfc.DEFAULT, epochs=2, batch_size=32, dequantization="variational")
    assert metrics["settings"] == dataclasses.asdict(settings)
    assert metrics["figures"] == nf.FIGURES and metrics["milestones"] == {"halfway": 1}
    assert {f"{stem}.png" for stem in nf.FIGURES.values()} <= {p.name for p in out.iterdir()}
    model = nfc.build_model(settings)
    assert metrics["n_params"] == sum(p.numel() for p in model.parameters())
    model.load_state_dict(torch.load(out / "weights.pt", weights_only=True)["model"])
    test_loader = nf.mnist(smoke, batch_size=32)[2]
    test = metrics["test"]
    assert test["noise_samples"] == 3
    assert test["bpd"] == pytest.approx(nf.epoch_iter(model.eval(), test_loader, None), rel=1e-6)
    assert test["bpd_importance_weighted"] == pytest.approx(nf.importance_weighted_bpd(model, test_loader, 3),
                                                            rel=1e-6)
    assert test["bpd_importance_weighted"] < test["bpd"]
    torch.testing.assert_close(nfc.load_sampler(out / "checkpoint.pt")(8), nf.sample_images(model, 8))
    assert_resume_keeps_the_run(lambda: run_main(smoke, out, *flags, "--resume"), out, metrics, capsys)
    assert_refused_in_one_line(lambda: nfc.main(argv(smoke, out, "--resume")),
                               "dequantization=variational (asked: uniform)")
    assert_rebuild_reproduces_the_run(lambda: run_main(smoke, out, *flags, "--from_weights"), out, metrics)


def test_the_module_runs_and_refuses_a_bad_choice_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "extensions.nf_couplings", "--set", "coupling=cnv",
                             "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --set coupling=cnv: coupling is one of mlp, conv"
    assert not Path(tmp_path / "out").exists()
    usage = subprocess.run([sys.executable, "-m", "extensions.nf_couplings", "--help"], cwd=REPO,
                           capture_output=True, text=True)
    assert usage.returncode == 0 and "results/extensions/nf_conv" in usage.stdout
    assert "Flow++" in usage.stdout  # the module's own description
