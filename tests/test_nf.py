"""The RealNVP flow against known answers: invertibility, exact log-determinants, closed-form
likelihoods of the identity flow, and its command line end to end on small fake data."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from scipy.special import expit, logit
from torch import nn

import a3_nf_template as nf
import common
import evaluation
import evaluation.classifier
from datasets.loader import TensorLoader

ALPHA = nf.Model.ALPHA
COUPLING = nf.Coupling  # the script's class, kept before any test swaps in the small one


class SmallCoupling(COUPLING):
    """The script's coupling with a narrow network, so whole models are cheap to train and to
    differentiate; everything else (mask, tanh, zero init) is the script's own code."""

    def __init__(self, c_in, mask):
        super().__init__(c_in, mask, n_hidden=16)


@pytest.fixture
def small_couplings(monkeypatch):
    monkeypatch.setattr(nf, "Coupling", SmallCoupling)


def perturb(module, seed=0, std=0.05):
    """Re-initialise the last layer of every coupling so that the flow is far from the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for coupling in module.modules():
            if isinstance(coupling, COUPLING):
                last = coupling.nn[-1]
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


@pytest.mark.parametrize("build", [lambda: nf.Coupling(c_in=784, mask=nf.get_mask()),
                                   lambda: nf.Flow([784], n_flows=2)], ids=["coupling", "flow"])
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

def test_log_determinant_matches_the_full_jacobian(small_couplings):
    torch.manual_seed(0)
    model = perturb(nf.Model([784]), std=0.2).double()
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
    frozen = nf.epoch_iter(model, loader, torch.optim.SGD(model.parameters(), lr=0.0))
    assert frozen == pytest.approx(expected, rel=1e-6)
    assert all(p.grad is not None for p in model.parameters())

    model.eval()
    before = nf.epoch_iter(model, loader, None)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(10):
        nf.epoch_iter(model, loader, optimizer, clip=100.0)
    model.eval()
    assert nf.epoch_iter(model, loader, None) < before - 0.01


# ---------------------------------------------------------------- bf16 training matmuls

@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_gradients_matches_clip_grad_norm(max_norm):
    """Above the threshold the gradients are scaled exactly as by clip_grad_norm_; below it they are
    left bit for bit as they were."""
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


def test_bf16_training_step_keeps_the_loss_and_gradient_of_fp32():
    """The speed-up must not change results: on a fixed seed and batch, the full-size model's bpd and
    gradient under bf16 matmuls agree with fp32, and the log-det stays fp32."""
    images = pixel_images(16, seed=6)
    results = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(1)
        model = perturb(nf.Model([784]), std=0.01).train()
        with common.autocast(precision, torch.device("cpu")):
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


def test_evaluation_ignores_the_training_precision(small_couplings):
    model = perturb(nf.Model([784])).eval()
    loader = TensorLoader(pixel_images(6, seed=7), torch.zeros(6), batch_size=3)
    assert nf.epoch_iter(model, loader, None, precision="bf16") == nf.epoch_iter(model, loader, None)


def test_auto_precision_is_fp32_off_the_cpu_and_explicit_choices_pass_through():
    assert common.training_precision("auto", torch.device("cuda")) == "fp32"
    assert common.training_precision("fp32", torch.device("cpu")) == "fp32"
    assert common.training_precision("bf16", torch.device("cpu")) == "bf16"
    has_amx = torch.cpu._is_amx_tile_supported()
    assert common.training_precision("auto", torch.device("cpu")) == ("bf16" if has_amx else "fp32")


# ---------------------------------------------------------------- command line

def fake_mnist_loaders(root, batch_size, **_):
    generator = torch.Generator().manual_seed(0)

    def loader(n, **kwargs):
        images = torch.randint(0, 256, (n, 784), generator=generator).float()
        return TensorLoader(images, torch.randint(0, 10, (n,), generator=generator),
                            batch_size=batch_size, **kwargs)

    return loader(48, shuffle=True), loader(16), loader(16)


@pytest.fixture
def patched_cli(monkeypatch, small_couplings):
    """Tiny data, small couplings, and an evaluation package that records what it is given."""
    evaluated = []

    def evaluate_samples(images, root="./data/", device="cpu"):
        evaluated.append(images)
        return {"fid": float(images.mean())}

    def load_classifier(root, device):
        raise AssertionError("the flow script should not need the classifier itself")

    monkeypatch.setattr(nf, "mnist", fake_mnist_loaders)
    monkeypatch.setattr(evaluation, "evaluate_samples", evaluate_samples)
    monkeypatch.setattr(evaluation.classifier, "load_classifier", load_classifier)
    return evaluated


def run_cli(tmp_path, out, *flags):
    return nf.main(["--batch-size", "16", "--eval-samples", "20", "--device", "cpu",
                    "--data-root", str(tmp_path), "--out", str(out), *flags])


def test_cli_smoke_run_writes_every_output_and_resumes(tmp_path, patched_cli, capsys):
    out = tmp_path / "nf"
    returned = run_cli(tmp_path, out, "--epochs", "2")

    stems = ["bpd", "samples_start", "samples_halfway", "samples_end"]
    expected = {f"{stem}.{ext}" for stem in stems for ext in ("png", "pdf")}
    outputs = expected | {"epochs", "metrics.json", "checkpoint.pt", "train.log"}
    assert {p.name for p in out.iterdir()} == outputs
    assert {p.name for p in (out / "epochs").iterdir()} == {"epoch_01.png", "epoch_02.png"}
    assert Image.open(out / "epochs" / "epoch_02.png").size == (8 * 30 + 2, 8 * 30 + 2)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(returned))
    for key in ("args", "command", "git_commit", "device", "torch", "threads", "started"):
        assert key in metrics
    assert metrics["args"]["epochs"] == 2 and metrics["epochs_completed"] == 2
    curves = metrics["curves"]
    assert set(curves) == {"train_bpd", "val_bpd", "wall_time_s"}
    assert all(len(values) == 2 for values in curves.values())
    assert 0 < curves["wall_time_s"][0] < curves["wall_time_s"][1] == metrics["wall_time_s"]
    assert metrics["images_per_s"] == pytest.approx(2 * 48 / metrics["wall_time_s"])
    assert metrics["n_params"] == sum(p.numel() for p in nf.Model([784]).parameters())
    assert all(4 < bpd < 12 for bpd in curves["train_bpd"] + curves["val_bpd"])

    # The test bpd is the deterministic eval pass of the saved model over the test loader.
    model = nf.Model([784])
    model.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=False)["model"])
    test_loader = fake_mnist_loaders(tmp_path, 16)[2]
    assert metrics["test"]["bpd"] == pytest.approx(nf.epoch_iter(model.eval(), test_loader, None), rel=1e-6)

    # The evaluation package got the checkpoint's samples, in [0, 1] and on whole pixel levels.
    (images,) = patched_cli
    assert images.shape == (20, 784) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(images * 255, (images * 255).round())
    assert metrics["evaluation"] == {"fid": float(images.mean())}
    assert torch.equal(nf.load_sampler(out / "checkpoint.pt")(20), images)

    capsys.readouterr()
    resumed = run_cli(tmp_path, out, "--epochs", "3", "--resume")
    assert "resumed from" in capsys.readouterr().out
    assert resumed["epochs_completed"] == 3
    for name, values in resumed["curves"].items():
        assert len(values) == 3 and values[:2] == curves[name]
    assert (out / "epochs" / "epoch_03.png").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 3


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, patched_cli, monkeypatch):
    out = tmp_path / "nf"
    run_epoch = nf.run_epoch

    def poisoned_in_epoch_two(model, data, optimizer, scheduler=None, clip=None, epoch=0, precision="fp32"):
        if epoch == 2:
            with torch.no_grad():
                model.flow.layers[0].nn[-1].bias.fill_(math.nan)
        return run_epoch(model, data, optimizer, scheduler, clip, epoch, precision)

    monkeypatch.setattr(nf, "run_epoch", poisoned_in_epoch_two)
    checkpoint = out / "checkpoint.pt"
    with pytest.raises(common.NonFiniteLossError, match="epoch 2"):
        run_cli(tmp_path, out, "--epochs", "2")
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["epoch"] == 1 and len(saved["curves"]["train_bpd"]) == 1
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    assert not (out / "metrics.json").exists()
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()

    # Without the poison, --resume picks up from the good epoch.
    monkeypatch.setattr(nf, "run_epoch", run_epoch)
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == digest
    metrics = run_cli(tmp_path, out, "--epochs", "2", "--resume")
    assert metrics["curves"]["train_bpd"][0] == saved["curves"]["train_bpd"][0]
    assert metrics["epochs_completed"] == 2


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--lr", "-1"), ("--batch-size", "0")])
def test_bad_values_are_argparse_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        nf.parse_args([flag, value])
    assert exit_info.value.code == 2
    assert "must be a positive" in capsys.readouterr().err
