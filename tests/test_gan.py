"""The GAN's networks, losses and training steps against known answers, and its command line end to
end on small fake data."""

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import needs_amx
from PIL import Image
from torch import nn

import a3_gan_template as gan
import evaluation
import evaluation.classifier
from datasets.loader import TensorLoader


def real_images(n, seed=0):
    """Fake "real" images [n, 1, 28, 28] in [-1, 1], brighter towards the middle."""
    generator = torch.Generator().manual_seed(seed)
    centre = torch.linspace(-1, 1, 28).abs()
    brightness = 1 - (centre[:, None] + centre[None, :])
    return (brightness + 0.3 * torch.randn(n, 1, 28, 28, generator=generator)).clamp(-1, 1)


def networks(seed=0, latent_dim=100):
    torch.manual_seed(seed)
    return gan.Generator(latent_dim), gan.Discriminator()


def layer_summary(module):
    summary = []
    for layer in module.net:
        if isinstance(layer, nn.Linear):
            summary.append(("Linear", layer.in_features, layer.out_features))
        elif isinstance(layer, nn.BatchNorm1d):
            summary.append(("BatchNorm1d", layer.num_features))
        elif isinstance(layer, nn.LeakyReLU):
            summary.append(("LeakyReLU", layer.negative_slope))
        else:
            summary.append((type(layer).__name__,))
    return summary


# ---------------------------------------------------------------- networks

def test_networks_have_the_template_layers():
    generator, discriminator = networks()
    assert layer_summary(generator) == [
        ("Linear", 100, 128), ("LeakyReLU", 0.2),
        ("Linear", 128, 256), ("BatchNorm1d", 256), ("LeakyReLU", 0.2),
        ("Linear", 256, 512), ("BatchNorm1d", 512), ("LeakyReLU", 0.2),
        ("Linear", 512, 1024), ("BatchNorm1d", 1024), ("LeakyReLU", 0.2),
        ("Linear", 1024, 784), ("Tanh",),
    ]
    assert layer_summary(discriminator) == [
        ("Linear", 784, 512), ("LeakyReLU", 0.2), ("Linear", 512, 256), ("LeakyReLU", 0.2),
        ("Linear", 256, 1),
    ]


def test_shapes_and_output_ranges():
    generator, discriminator = networks()
    with torch.no_grad():
        images = generator(torch.randn(16, 100) * 10)  # large z: the tanh must still bound the pixels
        assert images.shape == (16, 784)
        assert images.min() >= -1 and images.max() <= 1 and images.abs().max() > 0.9

        probabilities = discriminator(images)
        assert probabilities.shape == (16,)
        assert ((probabilities > 0) & (probabilities < 1)).all()
        # Square images give the same answers as flat ones, and forward is the sigmoid of the logits.
        torch.testing.assert_close(discriminator(images.reshape(16, 1, 28, 28)), probabilities)
        torch.testing.assert_close(torch.sigmoid(discriminator.logits(images)), probabilities)


# ---------------------------------------------------------------- losses

def test_losses_are_the_binary_cross_entropies_of_the_probabilities():
    generator = torch.Generator().manual_seed(0)
    real_logits, fake_logits = torch.randn(2, 32, generator=generator, dtype=torch.float64) * 3
    d_real, d_fake = (torch.sigmoid(t).numpy() for t in (real_logits, fake_logits))
    expected_d = np.mean(-np.log(d_real)) + np.mean(-np.log(1 - d_fake))  # -log D(x) - log(1 - D(G(z)))
    expected_g = np.mean(-np.log(d_fake))  # -log D(G(z))
    assert gan.discriminator_loss(real_logits, fake_logits).item() == pytest.approx(expected_d, rel=1e-12)
    assert gan.generator_loss(fake_logits).item() == pytest.approx(expected_g, rel=1e-12)

    # A discriminator that is sure and right costs nothing.
    sure_and_right = gan.discriminator_loss(torch.tensor([50.0]), torch.tensor([-50.0]))
    assert sure_and_right.item() == pytest.approx(0, abs=1e-20)
    assert gan.generator_loss(torch.tensor([50.0])).item() == pytest.approx(0, abs=1e-20)


def test_losses_stay_finite_for_huge_logits():
    real_logits = torch.tensor([-1e4, 1e4, -200.0], requires_grad=True)  # sigmoid rounds to 0 or 1
    fake_logits = torch.tensor([1e4, -1e4, 200.0], requires_grad=True)
    loss_d = gan.discriminator_loss(real_logits, fake_logits)
    loss_g = gan.generator_loss(fake_logits)
    assert loss_d.item() == pytest.approx((1e4 + 200) / 3 * 2)
    assert loss_g.item() == pytest.approx(1e4 / 3)
    (loss_d + loss_g).backward()
    assert torch.isfinite(real_logits.grad).all() and torch.isfinite(fake_logits.grad).all()
    torch.testing.assert_close(real_logits.grad, torch.tensor([-1.0, 0.0, -1.0]) / 3)


# ---------------------------------------------------------------- training steps

def one_batch_run(optimizer_lrs, seed=0, n=32):
    """One call of ``train`` on one fixed batch with SGD at the given (G, D) learning rates.

    Returns the losses before and after, each measured on the same batch and the same z that
    ``train`` draws, plus the statistics ``train`` returned.
    """
    generator, discriminator = networks(seed)
    real = real_images(n, seed).reshape(n, 784)
    torch.manual_seed(seed + 1)
    z = torch.randn(n, 100)

    def losses():
        generator.train()  # BatchNorm on batch statistics, as in train(): deterministic for fixed z
        with torch.no_grad():
            fakes = generator(z)
            real_logits, fake_logits = discriminator.logits(real), discriminator.logits(fakes)
        return {"loss_d": gan.discriminator_loss(real_logits, fake_logits).item(),
                "loss_g": gan.generator_loss(fake_logits).item(),
                "d_real": torch.sigmoid(real_logits).mean().item(),
                "d_fake": torch.sigmoid(fake_logits).mean().item(), "fakes": fakes}

    lr_g, lr_d = optimizer_lrs
    before = losses()
    torch.manual_seed(seed + 1)  # train() draws the same z first
    stats = gan.train(TensorLoader(real, torch.zeros(n), batch_size=n), discriminator, generator,
                      torch.optim.SGD(generator.parameters(), lr=lr_g),
                      torch.optim.SGD(discriminator.parameters(), lr=lr_d))
    return before, losses(), stats


def test_train_returns_the_four_means_of_the_batch():
    before, after, stats = one_batch_run((0.0, 0.0))
    assert set(stats) == {"loss_d", "loss_g", "d_real", "d_fake"}
    for key in stats:
        assert stats[key] == pytest.approx(before[key], rel=1e-5)
        assert after[key] == before[key]  # zero learning rates changed nothing


def test_a_generator_step_lowers_the_generator_loss():
    before, after, _ = one_batch_run((0.05, 0.0))
    assert after["loss_g"] < before["loss_g"] - 1e-3
    assert after["d_fake"] > before["d_fake"]


def test_a_discriminator_step_lowers_the_discriminator_loss_and_leaves_the_generator_alone():
    before, after, _ = one_batch_run((0.0, 0.05))
    assert after["loss_d"] < before["loss_d"] - 1e-3
    assert after["d_real"] > before["d_real"] and after["d_fake"] < before["d_fake"]
    assert torch.equal(after["fakes"], before["fakes"])  # the fakes were detached from G


@needs_amx
def test_bf16_training_steps_follow_the_fp32_ones():
    """Three steps with bf16 matmuls, R1 penalty included, stay close to fp32 from the same seed: the
    same mean losses to 1e-2 and generator weight matrices that moved the same way (cosine similarity
    of the updates above 0.95, 0.987 when written: Adam's first steps are about lr * sign(gradient),
    so elements whose gradient is within bf16 rounding of 0 step either way; biases are left out, as
    those before a batch norm have nothing but such gradients); the setting is restored afterwards."""
    batches = TensorLoader(real_images(96), torch.zeros(96), batch_size=32)
    runs = {}
    for precision in ("fp32", "bf16"):
        generator, discriminator = networks()
        weights = [p for p in generator.parameters() if p.dim() == 2]
        start = torch.nn.utils.parameters_to_vector(weights).detach().clone()
        optimizers = gan.make_optimizers(generator, discriminator, gan.parse_args([]))
        torch.manual_seed(1)
        stats = gan.train(batches, discriminator, generator, *optimizers, r1_gamma=0.3, r1_interval=2,
                          precision=precision)
        update = torch.nn.utils.parameters_to_vector(weights).detach() - start
        runs[precision] = stats, update
    (stats_fp32, update_fp32), (stats_bf16, update_bf16) = runs["fp32"], runs["bf16"]
    for key in stats_fp32:
        assert stats_bf16[key] == pytest.approx(stats_fp32[key], abs=1e-2)
    assert torch.cosine_similarity(update_bf16, update_fp32, dim=0) > 0.95
    assert not torch.equal(update_bf16, update_fp32)  # the matmuls did run in bf16
    assert torch.backends.mkldnn.matmul.fp32_precision in ("none", "ieee")


def test_r1_penalty_of_a_linear_discriminator_is_the_squared_weight_norm():
    torch.manual_seed(0)
    layer = nn.Linear(784, 1)  # logit w.x + b: its gradient in x is w for every image
    real = real_images(8).reshape(8, 784).requires_grad_(True)
    penalty = gan.r1_penalty(real, layer(real).squeeze(1))
    torch.testing.assert_close(penalty, layer.weight.square().sum())
    penalty.backward()  # differentiable in D's parameters: d||w||^2/dw = 2w
    torch.testing.assert_close(layer.weight.grad, 2 * layer.weight.detach())
    assert layer.bias.grad is None or torch.all(layer.bias.grad == 0)


@pytest.mark.parametrize("interval", [1, 4])
def test_r1_adds_its_gradient_to_the_discriminator_step_only(interval):
    """On the first batch the penalty is applied, weighted by the interval when it is lazy."""
    n, gamma, lr = 16, 3.0, 0.05
    real = real_images(n).reshape(n, 784)

    def step(r1_gamma):
        generator, discriminator = networks()
        torch.manual_seed(1)
        gan.train(TensorLoader(real, torch.zeros(n), batch_size=n), discriminator, generator,
                  torch.optim.SGD(generator.parameters(), lr=lr),
                  torch.optim.SGD(discriminator.parameters(), lr=lr), r1_gamma=r1_gamma,
                  r1_interval=interval)
        return generator, discriminator

    generator_plain, discriminator_plain = step(0.0)
    generator_r1, discriminator_r1 = step(gamma)
    _, reference = networks()  # D before the step: the penalty's gradient is taken there
    x = real.clone().requires_grad_(True)
    parameters = list(reference.parameters())
    penalty_grads = torch.autograd.grad(gan.r1_penalty(x, reference.logits(x)), parameters,
                                        allow_unused=True, materialize_grads=True)
    assert penalty_grads[0].abs().max() > 0
    for plain, with_r1, grad in zip(discriminator_plain.parameters(), discriminator_r1.parameters(),
                                    penalty_grads, strict=True):
        torch.testing.assert_close(with_r1 - plain, -lr * gamma * interval / 2 * grad, atol=1e-6,
                                   rtol=1e-4)
    for plain, with_r1 in zip(generator_plain.parameters(), generator_r1.parameters(), strict=True):
        assert torch.equal(plain, with_r1)


def test_lazy_r1_regularizes_every_kth_batch_only():
    """Three batches with interval 2 are the same training as: batch 0 with the penalty (applied on
    batch 0), batch 1 without it, batch 2 with it again."""
    n, gamma, lr = 8, 3.0, 0.05
    batches = [real_images(n, seed).reshape(n, 784) for seed in range(3)]

    def optimizers(generator, discriminator):
        return (torch.optim.SGD(generator.parameters(), lr=lr),
                torch.optim.SGD(discriminator.parameters(), lr=lr))

    generator_lazy, discriminator_lazy = networks()
    torch.manual_seed(1)
    gan.train(TensorLoader(torch.cat(batches), torch.zeros(3 * n), batch_size=n), discriminator_lazy,
              generator_lazy, *optimizers(generator_lazy, discriminator_lazy), r1_gamma=gamma,
              r1_interval=2)

    generator, discriminator = networks()
    optimizer_G, optimizer_D = optimizers(generator, discriminator)
    torch.manual_seed(1)
    for batch, weight in zip(batches, (2 * gamma, 0.0, 2 * gamma), strict=True):
        gan.train(TensorLoader(batch, torch.zeros(n), batch_size=n), discriminator, generator,
                  optimizer_G, optimizer_D, r1_gamma=weight)
    for lazy, reference in zip(discriminator_lazy.parameters(), discriminator.parameters(), strict=True):
        torch.testing.assert_close(lazy, reference, atol=1e-6, rtol=1e-5)


def test_recompute_batchnorm_averages_each_batch_statistics_with_equal_weight():
    generator = gan.Generator(latent_dim=8)
    generator.eval()
    first_linear, first_norm = generator.net[2], generator.net[3]
    rng_state = torch.get_rng_state()
    gan.recompute_batchnorm(generator, n_batches=5, batch_size=16, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_state)  # its own random stream
    assert not generator.training and first_norm.momentum == 0.1
    z = torch.randn(5, 16, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = first_linear(generator.net[1](generator.net[0](z)))  # [5 batches, 16, 256]
    torch.testing.assert_close(first_norm.running_mean, hidden.mean((0, 1)))
    torch.testing.assert_close(first_norm.running_var, hidden.var(1, unbiased=True).mean(0))
    assert first_norm.num_batches_tracked == 5


def test_update_average_moves_weights_by_one_minus_decay_and_copies_batchnorm_statistics():
    average, generator = gan.Generator(), gan.Generator()
    with torch.no_grad():
        for p in average.parameters():
            p.fill_(1.0)
        for p in generator.parameters():
            p.fill_(3.0)
        generator.net[3].running_mean.fill_(0.5)
        generator.net[3].num_batches_tracked.fill_(7)
    gan.update_average(average, generator, decay=0.75)
    for p in average.parameters():
        assert torch.all(p == 1.5)  # 0.75 * 1 + 0.25 * 3
    assert torch.all(generator.net[0].weight == 3.0)  # the generator itself is untouched
    assert torch.all(average.net[3].running_mean == 0.5) and average.net[3].num_batches_tracked == 7


def test_train_averages_over_batches_and_saves_interval_grids(tmp_path):
    generator, discriminator = networks()
    images = real_images(40)
    loader = TensorLoader(images, torch.zeros(40), batch_size=8)  # 5 batches
    fixed_z = torch.randn(25, 100)
    optimizers = [torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.5, 0.999))
                  for m in (generator, discriminator)]
    for epoch in (0, 1):
        stats = gan.train(loader, discriminator, generator, *optimizers, epoch=epoch, save_interval=2,
                          interval_dir=tmp_path, fixed_z=fixed_z)
        assert all(np.isfinite(v) for v in stats.values())
        assert 0 < stats["d_real"] < 1 and 0 < stats["d_fake"] < 1
    # batches are counted over the run: 0, 2, 4 in epoch 0 and 6, 8 in epoch 1 (5 per epoch)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"batch_{i:06d}.png" for i in (0, 2, 4, 6, 8)]
    assert Image.open(tmp_path / "batch_000008.png").size == (5 * 30 + 2, 5 * 30 + 2)


def test_train_means_are_averages_over_the_batches():
    generator, discriminator = networks()
    images = real_images(24).reshape(24, 784)
    torch.manual_seed(10)
    zs = [torch.randn(8, 100) for _ in range(3)]  # what train() draws, batch by batch
    per_batch = []
    with torch.no_grad():
        for real, z in zip(images.split(8), zs, strict=True):
            real_logits, fake_logits = discriminator.logits(real), discriminator.logits(generator(z))
            per_batch.append([gan.discriminator_loss(real_logits, fake_logits).item(),
                              gan.generator_loss(fake_logits).item(),
                              torch.sigmoid(real_logits).mean().item(),
                              torch.sigmoid(fake_logits).mean().item()])
    expected = np.mean(per_batch, axis=0)
    assert np.ptp(per_batch, axis=0).min() > 0  # the batches differ, so the mean is a real check

    frozen = [torch.optim.SGD(m.parameters(), lr=0.0) for m in (generator, discriminator)]
    torch.manual_seed(10)
    stats = gan.train(TensorLoader(images, torch.zeros(24), batch_size=8), discriminator, generator, *frozen)
    np.testing.assert_allclose([stats[k] for k in ("loss_d", "loss_g", "d_real", "d_fake")], expected,
                               rtol=1e-5)


# ---------------------------------------------------------------- interpolation

def test_interpolation_endpoints_reproduce_the_sources_and_steps_are_even():
    generator, _ = networks()
    z0, z1 = torch.randn(2, 100, generator=torch.Generator().manual_seed(3))
    path = gan.interpolate(z0, z1)
    assert path.shape == (9, 100)
    torch.testing.assert_close(path[0], z0, rtol=0, atol=1e-7)
    torch.testing.assert_close(path[-1], z1, rtol=0, atol=1e-7)
    steps = path.diff(dim=0)
    torch.testing.assert_close(steps, ((z1 - z0) / 8).expand(8, -1))

    images = gan.generate(generator, path)
    assert images.shape == (9, 784) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images[[0, -1]], gan.generate(generator, torch.stack([z0, z1])),
                               rtol=0, atol=1e-5)
    assert generator.training  # generate() puts BatchNorm back in training mode


def test_generate_is_independent_of_the_batch():
    generator, _ = networks()
    z = torch.randn(6, 100)
    together = gan.generate(generator, z)
    alone = torch.cat([gan.generate(generator, row[None]) for row in z])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    with torch.no_grad():
        generator.eval()
        torch.testing.assert_close(together, (generator(z) + 1) / 2)


# ---------------------------------------------------------------- command line

class TinyClassifier(nn.Module):
    """A random linear "digit classifier": forward gives [N, 10] logits of images in [0, 1]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(784, 10)

    def forward(self, x):
        return self.head(x.reshape(len(x), 784))


def fake_evaluation(images):
    """The keys of evaluation.evaluate_samples, with the mean brightness standing in for the FID."""
    return {"fid": images.mean().item(), "score": 1.0, "class_fractions": [0.1] * 10,
            "class_kl_uniform": 0.0, "parzen_ll": -100.0, "parzen_se": 1.0, "parzen_sigma": 0.2,
            "n_samples": len(images)}


@pytest.fixture
def patched_cli(monkeypatch):
    """Tiny data and an evaluation package that scores samples by their mean brightness."""
    evaluated = []

    def fake_mnist_gan(root, batch_size, **_):
        return TensorLoader(real_images(48), torch.zeros(48, dtype=torch.int64), batch_size=batch_size,
                            shuffle=True)

    def evaluate_samples(images, root="./data/", device="cpu", classifier=None):
        evaluated.append(images)
        return fake_evaluation(images)

    monkeypatch.setattr(gan, "mnist_gan", fake_mnist_gan)
    monkeypatch.setattr(evaluation, "evaluate_samples", evaluate_samples)
    monkeypatch.setattr(evaluation.classifier, "load_classifier", lambda root, device: TinyClassifier())
    return evaluated


def run_cli(tmp_path, out, *flags):
    return gan.main(["--n_epochs", "2", "--batch_size", "16", "--save_interval", "2", "--device", "cpu",
                     "--data-root", str(tmp_path), "--out", str(out), *flags])


def test_cli_smoke_run_writes_every_output_and_resume_redraws_them(tmp_path, patched_cli, capsys):
    out = tmp_path / "gan"
    returned = run_cli(tmp_path, out)

    stems = ["samples_start", "samples_halfway", "samples_end", "losses", "interpolation", "interpolations"]
    expected = {f"{stem}.{ext}" for stem in stems for ext in ("png", "pdf")}
    outputs = expected | {"intervals", "metrics.json", "checkpoint.pt", "train.log"}
    assert {p.name for p in out.iterdir()} == outputs
    # 3 batches per epoch, a grid every 2 batches counted over the run: 0, 2, 4
    assert sorted(p.name for p in (out / "intervals").iterdir()) == [f"batch_{i:06d}.png" for i in (0, 2, 4)]

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(returned))
    for key in ("args", "command", "git_commit", "device", "torch", "threads", "started", "n_params",
                "epochs_completed", "curves", "wall_time_s", "images_per_s", "progress", "evaluation"):
        assert key in metrics
    assert metrics["epochs_completed"] == 2 and metrics["args"]["n_epochs"] == 2
    curves = metrics["curves"]
    assert set(curves) == {"loss_d", "loss_g", "d_real", "d_fake", "wall_time_s"}
    assert all(len(values) == 2 for values in curves.values())
    assert 0 < curves["wall_time_s"][0] < curves["wall_time_s"][1] == metrics["wall_time_s"]
    assert metrics["images_per_s"] == pytest.approx(2 * 48 / metrics["wall_time_s"])
    generator, discriminator = networks()
    assert metrics["n_params"] == sum(p.numel() for m in (generator, discriminator) for p in m.parameters())

    # Progress rows: the generator of epoch 1 and of the last epoch, 10,000 samples each in [0, 1].
    assert [row["epoch"] for row in metrics["progress"]] == [1, 2]
    assert len(patched_cli) == 2
    for images, row in zip(patched_cli, metrics["progress"], strict=True):
        assert images.shape == (10_000, 784) and images.min() >= 0 and images.max() <= 1
        assert row == {"epoch": row["epoch"], **fake_evaluation(images)}
    assert patched_cli[0].mean() != patched_cli[1].mean()  # training moved the generator
    assert metrics["evaluation"] == metrics["progress"][-1]
    digits = [row["digits"] for row in metrics["interpolation_digits"]]
    assert digits == [list(pair) for pair in gan.INTERPOLATION_PAIRS]

    sample = gan.load_sampler(out / "checkpoint.pt")
    torch.testing.assert_close(sample(10_000), patched_cli[1])  # the sampler is the final generator

    # --resume of a finished run trains nothing, and redraws the figures and metrics the same.
    checkpoint = hashlib.sha256((out / "checkpoint.pt").read_bytes()).hexdigest()
    for stem in ("samples_end", "losses", "interpolation", "interpolations"):
        for ext in ("png", "pdf"):
            (out / f"{stem}.{ext}").unlink()
    (out / "metrics.json").unlink()
    capsys.readouterr()
    again = run_cli(tmp_path, out, "--resume")
    assert "resumed from" in capsys.readouterr().out
    assert hashlib.sha256((out / "checkpoint.pt").read_bytes()).hexdigest() == checkpoint
    outputs = expected | {"intervals", "metrics.json", "checkpoint.pt", "train.log"}
    assert {p.name for p in out.iterdir()} == outputs
    assert len(list((out / "intervals").iterdir())) == 3
    assert again["curves"] == curves and again["progress"] == metrics["progress"]
    assert again["epochs_completed"] == 2


@pytest.mark.parametrize("flag, value", [("--n_epochs", "0"), ("--lr", "-1"), ("--batch_size", "0")])
def test_bad_values_are_argparse_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gan.parse_args([flag, value])
    assert exit_info.value.code == 2
    assert "must be a positive" in capsys.readouterr().err


def test_a_negative_r1_weight_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gan.parse_args(["--r1_gamma", "-1"])
    assert exit_info.value.code == 2
    assert "must be a non-negative number" in capsys.readouterr().err
