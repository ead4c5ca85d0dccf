"""extensions.nf_multiscale against known answers: every piece of the multi-scale flow and the whole
flow invert exactly, their log-determinants are those of autograd's Jacobians, the untrained flow is
the identity on z (so the model's likelihood is the closed form of the logit transform alone), and
the module's command line end to end on a small fake MNIST folder."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import assert_rebuild_reproduces_the_run, assert_refused_in_one_line
from test_nf import (
    check_log_determinant_matches_the_full_jacobian,
    check_the_courses_unit_test_contract,
    closed_form_log_px,
    pixel_images,
)

import a3_nf_template as nf
from extensions import nf_couplings as nfc
from extensions import nf_multiscale as ms

TINY = {"n_scales": 3, "couplings": 2, "final_couplings": 2, "channels": 4, "blocks": 1}


def perturb(module, seed=0, std=0.1):
    """Random weights in every coupling network's zero-initialised output convolution, so that every
    coupling has non-zero log-scales and translations."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for net in module.modules():
            if isinstance(net, ms.ResNet):
                for parameter in (net.output.weight, net.output.bias):
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return module


def tiny_flow(seed=0, perturbed=True, **changes):
    torch.manual_seed(seed)
    flow = ms.MultiScaleFlow(**{**TINY, **changes})
    return perturb(flow, seed) if perturbed else flow


def tiny_model(dequantization=nf.UniformDequantization, **changes):
    return nf.Model([nf.N_PIXELS], flow=tiny_flow(**changes), dequantization=dequantization)


# ---------------------------------------------------------------- settings

def test_settings_are_the_answers_with_this_flows_fields_and_training():
    assert dataclasses.asdict(ms.DEFAULT) == {
        **dataclasses.asdict(nf.DEFAULT), "batch_size": 128, "lr": 1e-3, "warmup_epochs": 0.25, "epochs": 12,
        "dequantization": "uniform", "n_scales": 3, "couplings": 3, "final_couplings": 4, "channels": 64,
        "blocks": 1}
    assert {name: getattr(ms.TEMPLATE, name) for name in dataclasses.asdict(nf.TEMPLATE)} == \
        dataclasses.asdict(nf.TEMPLATE)


@pytest.mark.parametrize("setting, fragment", [("dequantization=learned", "uniform, variational"),
                                               ("n_scales=4", "at most 3"),
                                               ("channels=0", "channels must be positive")])
def test_a_bad_setting_ends_in_one_line(setting, fragment):
    assert_refused_in_one_line(lambda: ms.main(["--set", setting]), setting.split("=")[0], fragment)


def test_settings_build_the_architecture_they_name():
    """RealNVP's architecture on MNIST: at 28x28 and 14x14 three checkerboard couplings, a squeeze and
    three channel couplings, then four checkerboard couplings at 7x7; 0.5 to 2 million parameters."""
    model = ms.build_model(ms.DEFAULT)
    flow = model.flow
    assert isinstance(flow, ms.MultiScaleFlow) and flow.z_shape == (784,)
    assert isinstance(model.dequantizer, nf.UniformDequantization)
    kinds = [[type(layer).__name__ for layer in scale] for scale in flow.scales]
    assert kinds == [["CheckerboardCoupling"] * 3 + ["Squeeze"] + ["ChannelCoupling"] * 3] * 2
    assert [layer.mask.shape[-1] for layer in [*flow.scales[0][:3], *flow.scales[1][:3], *flow.final]] == \
        [28] * 3 + [14] * 3 + [7] * 4
    assert [layer.net.input.in_channels for layer in flow.scales[1][4:]] == [4] * 3  # half of [8, 7, 7]
    assert [layer.net.output.out_channels for layer in flow.final] == [8] * 4  # s and t of [4, 7, 7]
    nets = [net for net in flow.modules() if isinstance(net, ms.ResNet)]
    assert len(nets) == 16 and {(net.input.out_channels, len(net.blocks)) for net in nets} == {(64, 1)}
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 2e6
    variational = ms.build_model(dataclasses.replace(ms.DEFAULT, dequantization="variational", n_scales=2))
    assert isinstance(variational.dequantizer, nfc.VariationalDequantization)
    assert len(variational.flow.scales) == 1 and variational.flow.final[0].mask.shape[-1] == 14


# ---------------------------------------------------------------- invertibility

def round_trip(layer, h):
    """(forward(h), its ldj, reverse(forward(h)), the ldj of forward then reverse) in float64."""
    zeros = torch.zeros(len(h), dtype=torch.float64)
    with torch.no_grad():
        forward, ldj = layer(h, zeros)
        back, ldj_back = layer(forward, ldj, reverse=True)
    return forward, ldj, back, ldj_back


PIECES = {
    "squeeze": lambda: ms.Squeeze(),
    "split": lambda: ms.Split(),
    "checkerboard 28x28": lambda: perturb(ms.CheckerboardCoupling(1, 28, 0, channels=4)),
    "checkerboard 7x7": lambda: perturb(ms.CheckerboardCoupling(4, 7, 1, channels=4)),
    "channel, first half conditions": lambda: perturb(ms.ChannelCoupling(4, 0, channels=4)),
    "channel, second half conditions": lambda: perturb(ms.ChannelCoupling(4, 1, channels=4)),
}
SHAPES = {"squeeze": (1, 28, 28), "split": (4, 14, 14), "checkerboard 28x28": (1, 28, 28),
          "checkerboard 7x7": (4, 7, 7), "channel, first half conditions": (4, 14, 14),
          "channel, second half conditions": (4, 14, 14)}


@pytest.mark.parametrize("name", PIECES)
def test_each_piece_reverses_exactly(name):
    torch.manual_seed(0)
    layer = PIECES[name]().double()
    h = torch.randn(3, *SHAPES[name], dtype=torch.float64)
    forward, ldj, back, ldj_back = round_trip(layer, h)
    torch.testing.assert_close(back, h, rtol=0, atol=1e-12)
    torch.testing.assert_close(ldj_back, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)
    if name in ("squeeze", "split"):  # a permutation: the same values, no volume change
        flat = torch.cat([part.flatten(1) for part in forward], 1) if name == "split" else forward.flatten(1)
        assert torch.equal(flat.sort(1).values, h.flatten(1).sort(1).values) and not ldj.any()
    else:  # a coupling: a non-trivial round trip
        assert ldj.abs().min() > 0.1 and (forward - h).abs().mean() > 0.01


def test_the_whole_flow_reverses_exactly_and_passes_the_courses_check():
    flow = tiny_flow().double()
    z = torch.randn(4, 784, dtype=torch.float64)
    forward, ldj, back, ldj_back = round_trip(flow, z)
    assert forward.shape == (4, 784)
    torch.testing.assert_close(back, z, rtol=0, atol=1e-10)
    torch.testing.assert_close(ldj_back, torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-10)
    assert ldj.abs().min() > 1 and (forward - z).abs().mean() > 0.05
    check_the_courses_unit_test_contract(tiny_flow(seed=1))  # float32, through the answer's check


def test_couplings_pass_their_conditioning_half_through_and_depend_on_it_alone():
    torch.manual_seed(0)
    h = torch.randn(2, 4, 14, 14)
    checker = perturb(ms.CheckerboardCoupling(4, 14, 0, channels=4))
    out, _ = checker(h, torch.zeros(2))
    mask = checker.mask.bool().expand_as(h)
    assert torch.equal(out[mask], h[mask]) and (out[~mask] - h[~mask]).abs().mean() > 0.01
    changed = torch.where(mask, h, h + torch.randn_like(h))  # only the transformed pixels change
    for ours, theirs in zip(checker.scale_and_translation(h), checker.scale_and_translation(changed),
                            strict=True):
        torch.testing.assert_close(ours, theirs)
    channel = perturb(ms.ChannelCoupling(4, 1, channels=4))
    out, _ = channel(h, torch.zeros(2))
    assert torch.equal(out[:, 2:], h[:, 2:]) and (out[:, :2] - h[:, :2]).abs().mean() > 0.01


# ---------------------------------------------------------------- log-determinants

def test_log_determinant_of_the_model_matches_the_full_jacobian():
    """The perturbed tiny flow, through the answer's check: slogdet of autograd's 784 x 784 Jacobian of
    x -> z in float64 is the model's log-determinant, and forward() is the change of variables."""
    check_log_determinant_matches_the_full_jacobian(tiny_model())


@pytest.mark.parametrize("layer, shape", [(ms.Squeeze(), (2, 14, 14)), (ms.Split(), (4, 14, 14))],
                         ids=["squeeze", "split"])
def test_squeeze_and_split_are_permutations_with_log_determinant_zero(layer, shape):
    h = torch.randn(1, *shape, dtype=torch.float64)

    def flat(x):
        out, _ = layer(x.view(1, *shape), torch.zeros(1, dtype=torch.float64))
        return torch.cat([part.flatten(1) for part in out], 1)[0] if isinstance(out, tuple) else out.flatten()

    jacobian = torch.autograd.functional.jacobian(flat, h.flatten())
    assert set(jacobian.unique().tolist()) == {0.0, 1.0}
    assert (jacobian.sum(0) == 1).all() and (jacobian.sum(1) == 1).all()
    sign, log_abs_det = torch.linalg.slogdet(jacobian)
    assert abs(sign) == 1 and log_abs_det == 0 and not layer(h, torch.zeros(1))[1].any()


# ---------------------------------------------------------------- the untrained flow and the model

def test_untrained_flow_is_the_identity_on_z():
    """Zero-initialised couplings are the identity, and the layout of the latent variables undoes every
    squeeze and factoring out: the default flow maps z to z, both ways, with log-determinant 0."""
    flow = ms.build_model(ms.DEFAULT).flow
    z = torch.randn(3, 784)
    with torch.no_grad():
        for reverse in (False, True):
            out, ldj = flow(z, torch.zeros(3), reverse=reverse)
            assert torch.equal(out, z) and not ldj.any()
        perturbed, _ = perturb(flow)(z, torch.zeros(3))
    assert (perturbed - z).abs().mean() > 0.05


def test_untrained_model_likelihood_is_the_closed_form_and_samples_are_pixels():
    """The course's contract: forward gives [B] log-likelihoods, here those of the logit transform
    alone (closed form, float64); sample gives [n, 784] pixel values 0..255."""
    model = ms.build_model(dataclasses.replace(ms.DEFAULT, channels=8)).double()
    pixels = pixel_images(4, seed=3).double()
    noise = torch.rand(pixels.shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        log_px = model(pixels, generator=torch.Generator().manual_seed(7))
    assert log_px.shape == (4,)
    np.testing.assert_allclose(log_px.numpy(), closed_form_log_px(pixels, noise), rtol=1e-10)
    for dequantization in (nf.UniformDequantization, nfc.VariationalDequantization):
        samples = tiny_model(dequantization).sample(8, torch.Generator().manual_seed(0))
        assert samples.shape == (8, 784)
        assert torch.equal(samples, samples.floor()) and samples.min() >= 0 and samples.max() <= 255
        assert samples.std() > 10


# ---------------------------------------------------------------- command line

@pytest.fixture
def smoke(fake_mnist, small_splits, monkeypatch):
    monkeypatch.setattr(nf, "EVALUATION_SAMPLES", 100)
    monkeypatch.setattr(nf, "NOISE_SAMPLES", 2)
    return fake_mnist.root


def run_main(root, out, *flags):
    sizes = ("batch_size=40", "channels=4", "couplings=1", "final_couplings=1")
    ms.main(["--epochs", "1", *(word for size in sizes for word in ("--set", size)), "--device", "cpu",
             "--data_root", str(root), "--out", str(out), *flags])
    return json.loads((out / "metrics.json").read_text())


def test_smoke_run_writes_its_metrics_and_rebuilds_them_from_its_weights(smoke):
    out = smoke / "multiscale"
    metrics = run_main(smoke, out)
    settings = dataclasses.replace(ms.DEFAULT, epochs=1, batch_size=40, channels=4, couplings=1,
                                   final_couplings=1)
    assert metrics["settings"] == dataclasses.asdict(settings)
    model = ms.build_model(settings)
    assert metrics["n_params"] == sum(p.numel() for p in model.parameters())
    assert metrics["figures"] == nf.FIGURES and metrics["epochs_completed"] == 1
    model.load_state_dict(torch.load(out / "weights.pt", weights_only=True)["model"])
    test_loader = nf.mnist(smoke, batch_size=40)[2]
    assert metrics["test"]["bpd"] == pytest.approx(nf.epoch_iter(model.eval(), test_loader, None), rel=1e-6)
    torch.testing.assert_close(ms.load_sampler(out / "checkpoint.pt")(8), nf.sample_images(model, 8))
    assert_rebuild_reproduces_the_run(lambda: run_main(smoke, out, "--from_weights"), out, metrics)
