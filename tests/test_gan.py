"""The GAN's networks, losses and training steps against known answers, the speed-ups of its step
against the plain way, and its command line end to end on a small fake MNIST folder."""

import copy
import functools
import json
from types import SimpleNamespace

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
)
from PIL import Image
from torch import nn

import a3_gan_template as gan
import common
import evaluation
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


def one_batch(n, seed=0):
    return TensorLoader(real_images(n, seed).reshape(n, 784), torch.zeros(n), batch_size=n)


def sgd(generator, discriminator, lr_g, lr_d):
    return (torch.optim.SGD(generator.parameters(), lr=lr_g),
            torch.optim.SGD(discriminator.parameters(), lr=lr_d))


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


def test_settings_ours_and_the_templates():
    assert gan.TEMPLATE == {"batch_size": 64, "lr": 2e-4, "r1_gamma": 0.0, "r1_interval": 1,
                            "ema_decay": None, "lr_decay_start": 1.0}
    assert gan.OURS == {"batch_size": 128, "lr": 4e-4, "r1_gamma": 0.3, "r1_interval": 8,
                        "ema_decay": 0.999, "lr_decay_start": 0.5}


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

def one_batch_run(lr_g, lr_d, seed=0, n=32):
    """One call of ``train`` on one fixed batch with SGD at the given learning rates.

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

    before = losses()
    torch.manual_seed(seed + 1)  # train() draws the same z first
    stats = gan.train(TensorLoader(real, torch.zeros(n), batch_size=n), discriminator, generator,
                      *sgd(generator, discriminator, lr_g, lr_d))
    return before, losses(), stats


def test_train_returns_the_four_means_of_the_batch():
    before, after, stats = one_batch_run(0.0, 0.0)
    assert set(stats) == {"loss_d", "loss_g", "d_real", "d_fake"}
    for key in stats:
        assert stats[key] == pytest.approx(before[key], rel=1e-5)
        assert after[key] == before[key]  # zero learning rates changed nothing


def test_a_generator_step_lowers_the_generator_loss():
    before, after, _ = one_batch_run(0.05, 0.0)
    assert after["loss_g"] < before["loss_g"] - 1e-3
    assert after["d_fake"] > before["d_fake"]


def test_a_discriminator_step_lowers_the_discriminator_loss_and_leaves_the_generator_alone():
    before, after, _ = one_batch_run(0.0, 0.05)
    assert after["loss_d"] < before["loss_d"] - 1e-3
    assert after["d_real"] > before["d_real"] and after["d_fake"] < before["d_fake"]
    assert torch.equal(after["fakes"], before["fakes"])  # the fakes were detached from G


def test_the_generator_step_with_d_frozen_gives_the_gradients_of_the_unfrozen_step():
    """D is frozen for G's step so that backward skips D's weight gradients: G's gradient, and so
    its SGD step, is the one of the plain step that computes (and discards) them."""
    n, lr = 32, 0.05
    generator, discriminator = networks()
    torch.manual_seed(1)
    gan.train(one_batch(n), discriminator, generator, *sgd(generator, discriminator, lr, 0.0))
    assert all(p.requires_grad for p in discriminator.parameters())  # unfrozen again afterwards

    reference_g, reference_d = networks()
    torch.manual_seed(1)
    gan.generator_loss(reference_d.logits(reference_g(torch.randn(n, 100)))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reference_d.parameters())
    for trained, reference in zip(generator.parameters(), reference_g.parameters(), strict=True):
        torch.testing.assert_close(trained, reference - lr * reference.grad, rtol=0, atol=1e-7)
    for trained, reference in zip(discriminator.parameters(), reference_d.parameters(), strict=True):
        assert torch.equal(trained, reference)


def test_one_discriminator_pass_over_real_and_fake_images_equals_two_passes():
    """D has no batch norm, so scoring cat(real, fake) in one pass gives the logits, loss and
    gradients of two passes: the D step of ``train`` is the plain one."""
    n, lr = 32, 0.05
    real = real_images(n).reshape(n, 784)
    generator, discriminator = networks()
    with torch.no_grad():
        fakes = generator(torch.randn(n, 100, generator=torch.Generator().manual_seed(2)))
        together = discriminator.logits(torch.cat([real, fakes])).chunk(2)
        torch.testing.assert_close(together[0], discriminator.logits(real), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(together[1], discriminator.logits(fakes), rtol=1e-6, atol=1e-6)

    torch.manual_seed(1)
    gan.train(one_batch(n), discriminator, generator, *sgd(generator, discriminator, 0.0, lr))
    reference_g, reference_d = networks()
    torch.manual_seed(1)
    fakes = reference_g(torch.randn(n, 100)).detach()
    gan.discriminator_loss(reference_d.logits(real), reference_d.logits(fakes)).backward()
    for trained, reference in zip(discriminator.parameters(), reference_d.parameters(), strict=True):
        torch.testing.assert_close(trained, reference - lr * reference.grad, rtol=0, atol=1e-6)
    assert not torch.equal(discriminator.net[0].weight, reference_d.net[0].weight)  # it did step


def biases_before_batchnorm(sequential):
    """Names of the Linear biases that feed a BatchNorm: BN subtracts the batch mean, so their exact
    gradient is 0 and Adam, which normalises each gradient, moves them by up to lr per step in a
    direction set by rounding noise. Any change of rounding changes that noise, nothing else."""
    layers = list(sequential)
    return {f"net.{i}.bias" for i, (layer, after) in enumerate(zip(layers[:-1], layers[1:], strict=True))
            if isinstance(layer, nn.Linear) and isinstance(after, nn.BatchNorm1d)}


def adam_pair(generator, discriminator, fused):
    return [torch.optim.Adam(m.parameters(), lr=gan.OURS["lr"], betas=(0.5, 0.999), fused=fused)
            for m in (generator, discriminator)]


def test_fused_adam_trains_as_plain_adam():
    """The script's fused Adam is a speed-up only: three steps of ``train`` (R1 on the first) give
    the parameters, batch-norm statistics and mean losses of torch's plain Adam."""
    loader = TensorLoader(real_images(96).reshape(96, 784), torch.zeros(96), batch_size=32)
    runs = []
    for fused in (True, False):
        generator, discriminator = networks()
        torch.manual_seed(1)
        stats = gan.train(loader, discriminator, generator, *adam_pair(generator, discriminator, fused),
                          r1_gamma=0.3, r1_interval=2)
        runs.append((generator, discriminator, stats))
    (g_fused, d_fused, stats_fused), (g_plain, d_plain, stats_plain) = runs
    loose = biases_before_batchnorm(g_fused.net)
    assert loose == {"net.2.bias", "net.5.bias", "net.8.bias"}
    loose |= {f"net.{int(name.split('.')[1]) + 1}.running_mean" for name in loose}  # the mean holds the bias
    for fused, plain in ((g_fused, g_plain), (d_fused, d_plain)):
        for (name, a), b in zip(fused.state_dict().items(), plain.state_dict().values(), strict=True):
            tolerance = 3 * gan.OURS["lr"] if fused is g_fused and name in loose else 1e-6
            torch.testing.assert_close(a, b, rtol=0, atol=tolerance, msg=f"{name} differs")
    assert stats_fused == pytest.approx(stats_plain, rel=1e-6)
    untrained, _ = networks()
    assert (g_fused.net[0].weight - untrained.net[0].weight).abs().max() > 1e-4  # it did train


@needs_amx
def test_bf16_training_steps_follow_the_fp32_ones(monkeypatch):
    """Three steps with bf16 training matmuls, R1 penalty included, stay close to fp32 from the same
    seed: the same mean losses to 1e-2 and generator weight matrices that moved the same way (cosine
    similarity of the updates above 0.95: Adam's first steps are about lr * sign(gradient), so
    elements whose gradient is within bf16 rounding of 0 step either way; biases are left out, as
    those before a batch norm have nothing but such gradients)."""
    loader = TensorLoader(real_images(96), torch.zeros(96), batch_size=32)
    runs = {}
    for precision in ("fp32", "bf16"):
        monkeypatch.setattr(common, "_training_precision", precision)
        generator, discriminator = networks()
        weights = [p for p in generator.parameters() if p.dim() == 2]
        start = torch.nn.utils.parameters_to_vector(weights).detach().clone()
        torch.manual_seed(1)
        with common.training_precision():
            stats = gan.train(loader, discriminator, generator, *adam_pair(generator, discriminator, True),
                              r1_gamma=0.3, r1_interval=2)
        runs[precision] = stats, torch.nn.utils.parameters_to_vector(weights).detach() - start
    (stats_fp32, update_fp32), (stats_bf16, update_bf16) = runs["fp32"], runs["bf16"]
    for key in stats_fp32:
        assert stats_bf16[key] == pytest.approx(stats_fp32[key], abs=1e-2)
    assert torch.cosine_similarity(update_bf16, update_fp32, dim=0) > 0.95
    # That the bf16 mode really rounds the matmuls' inputs is test_common's AMX test: updates that
    # merely differ prove nothing, as the mode also changes which fp32 kernel oneDNN picks.


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
                  *sgd(generator, discriminator, lr, lr), r1_gamma=r1_gamma, r1_interval=interval)
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

    generator_lazy, discriminator_lazy = networks()
    torch.manual_seed(1)
    gan.train(TensorLoader(torch.cat(batches), torch.zeros(3 * n), batch_size=n), discriminator_lazy,
              generator_lazy, *sgd(generator_lazy, discriminator_lazy, lr, lr), r1_gamma=gamma, r1_interval=2)

    generator, discriminator = networks()
    optimizer_G, optimizer_D = sgd(generator, discriminator, lr, lr)
    torch.manual_seed(1)
    for batch, weight in zip(batches, (2 * gamma, 0.0, 2 * gamma), strict=True):
        gan.train(TensorLoader(batch, torch.zeros(n), batch_size=n), discriminator, generator,
                  optimizer_G, optimizer_D, r1_gamma=weight)
    for lazy, reference in zip(discriminator_lazy.parameters(), discriminator.parameters(), strict=True):
        torch.testing.assert_close(lazy, reference, atol=1e-6, rtol=1e-5)


def test_a_non_finite_loss_stops_the_epoch_with_a_run_error():
    generator, discriminator = networks()
    with torch.no_grad():
        discriminator.net[-1].bias.fill_(float("nan"))
    with pytest.raises(common.RunError, match="loss became nan at epoch 3"):
        gan.train(one_batch(8), discriminator, generator, *sgd(generator, discriminator, 0.0, 0.0), epoch=3)


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


def test_train_keeps_the_average_after_every_generator_step():
    """Two batches: the average is (decay-)averaged after each of the generator's two steps."""
    decay, lr = 0.5, 0.05
    loader = TensorLoader(real_images(16).reshape(16, 784), torch.zeros(16), batch_size=8)
    generator, discriminator = networks()
    average = copy.deepcopy(generator)
    torch.manual_seed(1)
    gan.train(loader, discriminator, generator, *sgd(generator, discriminator, lr, lr), average=average,
              ema_decay=decay)

    reference_g, reference_d = networks()
    expected = copy.deepcopy(reference_g)
    optimizers = sgd(reference_g, reference_d, lr, lr)
    torch.manual_seed(1)
    for batch in real_images(16).reshape(16, 784).split(8):
        gan.train(TensorLoader(batch, torch.zeros(8), batch_size=8), reference_d, reference_g, *optimizers)
        gan.update_average(expected, reference_g, decay)
    for a, b in zip(average.state_dict().values(), expected.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(average.net[0].weight, generator.net[0].weight)


def test_train_saves_interval_grids_counted_over_the_run(tmp_path):
    generator, discriminator = networks()
    loader = TensorLoader(real_images(40), torch.zeros(40), batch_size=8)  # 5 batches
    fixed_z = torch.randn(25, 100)
    optimizers = adam_pair(generator, discriminator, True)
    for epoch in (1, 2):
        stats = gan.train(loader, discriminator, generator, *optimizers, epoch=epoch, save_interval=2,
                          interval_dir=tmp_path, fixed_z=fixed_z)
        assert all(np.isfinite(v) for v in stats.values())
        assert 0 < stats["d_real"] < 1 and 0 < stats["d_fake"] < 1
    # batches are counted from 0 over the run: 0, 2, 4 in epoch 1 and 6, 8 in epoch 2 (5 per epoch)
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

    torch.manual_seed(10)
    stats = gan.train(TensorLoader(images, torch.zeros(24), batch_size=8), discriminator, generator,
                      *sgd(generator, discriminator, 0.0, 0.0))
    np.testing.assert_allclose([stats[k] for k in ("loss_d", "loss_g", "d_real", "d_fake")], expected,
                               rtol=1e-5)


# ---------------------------------------------------------------- learning rate

def test_learning_rate_decays_linearly_over_the_second_half():
    lr = gan.OURS["lr"]
    rates = [gan.get_lr(epoch, 200, lr, 0.5) for epoch in range(1, 201)]
    assert set(rates[:101]) == {lr}  # epochs 1-101
    assert rates[101] == pytest.approx(lr * 0.99) and rates[149] == pytest.approx(lr * 0.51)
    assert rates[-1] == pytest.approx(lr / 100)
    assert np.allclose(np.diff(rates[100:]), -lr / 100)
    assert [gan.get_lr(epoch, 3, lr, 0.5) for epoch in (1, 2, 3)] == [lr, lr, lr / 2]


def test_templates_learning_rate_is_constant():
    lr = gan.TEMPLATE["lr"]
    for n_epochs in (1, 2, 200):
        assert {gan.get_lr(epoch, n_epochs, lr, 1.0) for epoch in range(1, n_epochs + 1)} == {lr}


# ---------------------------------------------------------------- sampling and interpolation

def test_interpolation_endpoints_reproduce_the_sources_and_steps_are_even():
    generator, _ = networks()
    z0, z1 = torch.randn(2, 100, generator=torch.Generator().manual_seed(3))
    path = gan.interpolate(z0, z1)
    assert path.shape == (9, 100)
    torch.testing.assert_close(path[0], z0, rtol=0, atol=1e-7)
    torch.testing.assert_close(path[-1], z1, rtol=0, atol=1e-7)
    torch.testing.assert_close(path.diff(dim=0), ((z1 - z0) / 8).expand(8, -1))

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


def test_sample_images_are_seeded_and_drawn_in_chunks():
    generator, _ = networks()
    images = gan.sample_images(generator, 1500, seed=4)
    assert images.shape == (1500, 784) and 0 <= images.min() and images.max() <= 1
    z = torch.randn(1500, 100, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(images[1000:1010], gan.generate(generator, z[1000:1010]), rtol=0, atol=1e-5)
    assert not torch.equal(gan.sample_images(generator, 10, seed=5), images[:10])


class BrightnessClassifier(nn.Module):
    """A "digit classifier" whose class c means a mean brightness near c / 9 (a known answer)."""

    def forward(self, x):
        brightness = x.reshape(len(x), 784).mean(1, keepdim=True)
        return -200.0 * (brightness - torch.arange(10) / 9) ** 2


def test_find_digit_pairs_picks_the_most_confident_candidate_of_each_digit():
    generator, _ = networks()
    classifier = BrightnessClassifier()
    pairs = ((1, 7), (3, 8), (0, 6))
    found = gan.find_digit_pairs(generator, classifier, pairs, n_candidates=300, seed=2)
    z = torch.randn(300, 100, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        candidates = torch.softmax(classifier(gan.generate(generator, z)), dim=1)
    assert [(a, b) for _, _, a, b, _, _ in found] == list(pairs)
    for z_a, z_b, a, b, p_a, p_b in found:
        for z_digit, digit, p in ((z_a, a, p_a), (z_b, b, p_b)):
            assert any(torch.equal(z_digit, row) for row in z)  # one of the candidates
            with torch.no_grad():
                alone = torch.softmax(classifier(gan.generate(generator, z_digit[None])), dim=1)[0, digit]
            assert p == pytest.approx(alone.item(), rel=1e-4)
            assert p == pytest.approx(candidates[:, digit].max().item(), rel=1e-6)


def test_save_interpolations_writes_both_figures_and_names_the_digits(tmp_path):
    generator, _ = networks()
    rows = gan.save_interpolations(generator, BrightnessClassifier(), tmp_path)
    assert [row["digits"] for row in rows] == [list(pair) for pair in gan.INTERPOLATION_PAIRS]
    assert all(0 < p <= 1 for row in rows for p in row["classifier_confidence"])
    for stem in ("interpolation", "interpolations"):
        assert (tmp_path / f"{stem}.png").exists() and (tmp_path / f"{stem}.pdf").exists()


def test_progress_is_scored_against_the_selection_reference_and_g_is_restored(monkeypatch):
    calls = []

    def evaluate_samples(images, root, device, classifier, reference):
        calls.append((images, root, classifier, reference))
        return {"fid": images.mean().item(), "score": 1.0}

    monkeypatch.setattr(evaluation, "evaluate_samples", evaluate_samples)
    sample_images = gan.sample_images
    monkeypatch.setattr(gan, "sample_images", lambda generator, n, seed=0: sample_images(generator, 50, seed))
    generator, _ = networks(seed=0)
    snapshots = {5: networks(seed=5)[0].state_dict(), 1: networks(seed=1)[0].state_dict()}
    current = copy.deepcopy(generator.state_dict())
    log = []
    run = SimpleNamespace(data_root="root", device="cpu", log=log.append)
    classifier = BrightnessClassifier()
    rows = gan.evaluate_progress(generator, snapshots, classifier, run)

    assert [row["epoch"] for row in rows] == [1, 5]
    assert [call[1:] for call in calls] == [("root", classifier, "selection")] * 2
    for (images, *_), epoch in zip(calls, (1, 5), strict=True):
        torch.testing.assert_close(images, sample_images(networks(seed=epoch)[0], 50))
    assert rows[0] == {"epoch": 1, "fid": calls[0][0].mean().item(), "score": 1.0}
    for name, tensor in generator.state_dict().items():
        assert torch.equal(tensor, current[name])
    assert len(log) == 2 and "against the selection reference" in log[0]


def test_load_sampler_samples_from_the_weight_average_when_there_is_one(tmp_path):
    trained, average = networks(seed=1)[0], networks(seed=2)[0]
    for state, expected in (({"generator": trained.state_dict(), "generator_average": average.state_dict()},
                             average), ({"generator": trained.state_dict()}, trained)):
        path = tmp_path / "checkpoint.pt"
        torch.save({"args": {"latent_dim": 100}, "state": state, "epoch": 3}, path)
        torch.testing.assert_close(gan.load_sampler(path)(20, seed=3), gan.sample_images(expected, 20, 3))


# ---------------------------------------------------------------- command line

@pytest.fixture
def smoke(fake_mnist, small_splits, monkeypatch):
    """The script on the fake MNIST folder with its real data, evaluation and classifier code, at
    small sizes: 200 samples where it draws 10,000, 100 candidates for the interpolation ends, 4
    batches for the weight average's batch-norm statistics."""
    sample_images, find_digit_pairs = gan.sample_images, gan.find_digit_pairs
    monkeypatch.setattr(gan, "sample_images",
                        lambda generator, n, seed=0: sample_images(generator, min(n, 200), seed))
    monkeypatch.setattr(gan, "find_digit_pairs", lambda generator, classifier: find_digit_pairs(
        generator, classifier, n_candidates=100))
    monkeypatch.setattr(gan, "recompute_batchnorm", functools.partial(gan.recompute_batchnorm, n_batches=4))
    return fake_mnist.root


def argv(root, out, *flags):
    return ["--save_interval", "2", "--device", "cpu", "--data_root", str(root), "--out", str(out), *flags]


def run_main(root, out, *flags):
    gan.main(argv(root, out, *flags))
    return json.loads((out / "metrics.json").read_text())


def test_smoke_run_writes_every_output_and_resuming_it_reproduces_the_numbers(smoke, capsys):
    out = smoke / "gan"
    metrics = run_main(smoke, out, "--n_epochs", "3", "--batch_size", "32", "--resume")

    stems = ["samples_start", "samples_halfway", "samples_end", "losses", "interpolation", "interpolations",
             "memorisation"]
    expected = {f"{stem}.{ext}" for stem in stems for ext in ("png", "pdf")}
    assert {p.name for p in out.iterdir()} == expected | {"intervals", "metrics.json", "checkpoint.pt",
                                                          "weights.pt", "train.log"}
    # 4 batches per epoch (120 images), a grid every 2 batches counted over the run
    assert sorted(p.name for p in (out / "intervals").iterdir()) == [f"batch_{i:06d}.png"
                                                                     for i in range(0, 12, 2)]

    assert metrics["setting"] == {**gan.OURS, "batch_size": 32}
    assert metrics["epochs_completed"] == 3 and metrics["args"]["n_epochs"] == 3
    curves = metrics["curves"]
    assert set(curves) == {"loss_d", "loss_g", "d_real", "d_fake", "wall_time_s"}
    assert all(len(values) == 3 for values in curves.values())
    assert 0 < curves["wall_time_s"][0] < curves["wall_time_s"][2] == metrics["wall_time_s"]
    assert metrics["images_per_s"] == pytest.approx(3 * 120 / metrics["wall_time_s"])
    generator, discriminator = networks()
    n_generator = sum(p.numel() for p in generator.parameters())
    assert metrics["n_params_generator"] == n_generator
    assert metrics["n_params"] == n_generator + sum(p.numel() for p in discriminator.parameters())

    # The progress rows (epoch 1 and the last; halfway is epoch 1) against the selection reference,
    # the final evaluation against the test set.
    assert [row["epoch"] for row in metrics["progress"]] == [1, 3]
    assert {row["reference"] for row in metrics["progress"]} == {"selection"}
    assert metrics["evaluation"]["reference"] == "test" and metrics["evaluation"]["n_samples"] == 200
    assert metrics["progress"][-1]["fid"] != metrics["evaluation"]["fid"]
    digits = [row["digits"] for row in metrics["interpolation_digits"]]
    assert digits == [list(pair) for pair in gan.INTERPOLATION_PAIRS]

    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert set(saved["state"]) == {"generator", "discriminator", "optimizer_G", "optimizer_D",
                                   "generator_average"}
    assert sorted(saved["extra"]["snapshots"]) == [1, 3] and saved["extra"]["fixed_z"].shape == (25, 100)
    for name in ("optimizer_G", "optimizer_D"):
        group = saved["state"][name]["param_groups"][0]
        assert group["fused"] and group["betas"] == (0.5, 0.999)
        assert group["lr"] == pytest.approx(gan.get_lr(3, 3, 4e-4, 0.5)) == 2e-4  # decayed in epoch 3
    average = gan.Generator()
    average.load_state_dict(saved["state"]["generator_average"])
    torch.testing.assert_close(gan.load_sampler(out / "checkpoint.pt")(8), gan.sample_images(average, 8))

    resume = ("--n_epochs", "3", "--batch_size", "32", "--resume")
    assert_resume_keeps_the_run(lambda: run_main(smoke, out, *resume), out, metrics, capsys)
    assert len(list((out / "intervals").iterdir())) == 6

    assert_refused_in_one_line(lambda: gan.main(argv(smoke, out, "--n_epochs", "3", "--resume")),
                               "--batch_size 32 (asked: None)")

    # From the averaged generator's weights alone: the same numbers; the progress curve is kept.
    rebuild = ("--n_epochs", "3", "--batch_size", "32", "--from_weights")
    assert_rebuild_reproduces_the_run(lambda: run_main(smoke, out, *rebuild), out, metrics)
    assert set(torch.load(out / "weights.pt", weights_only=True)) == {"generator_average", "fixed_z"}


def test_template_flag_trains_the_templates_way(smoke, monkeypatch):
    calls = {"mnist_gan": [], "train": []}
    mnist_gan, train = gan.mnist_gan, gan.train
    monkeypatch.setattr(gan, "mnist_gan", lambda *args, **kwargs: calls["mnist_gan"].append(kwargs)
                        or mnist_gan(*args, **kwargs))
    monkeypatch.setattr(gan, "train", lambda *args, **kwargs: calls["train"].append(kwargs)
                        or train(*args, **kwargs))
    out = smoke / "template"
    metrics = run_main(smoke, out, "--template", "--n_epochs", "2")

    assert metrics["setting"] == gan.TEMPLATE
    assert calls["mnist_gan"] == [{"batch_size": 64}]
    for epoch, kwargs in enumerate(calls["train"], start=1):
        assert kwargs["epoch"] == epoch and kwargs["average"] is None and kwargs["r1_gamma"] == 0.0
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert "generator_average" not in saved["state"]  # samples come from G itself
    for name in ("optimizer_G", "optimizer_D"):
        assert saved["state"][name]["param_groups"][0]["lr"] == 2e-4  # constant, also in the last epoch
    generator = gan.Generator()
    generator.load_state_dict(saved["state"]["generator"])
    torch.testing.assert_close(gan.load_sampler(out / "checkpoint.pt")(8), gan.sample_images(generator, 8))
    assert [row["epoch"] for row in metrics["progress"]] == [1, 2]


def test_a_corrupted_mnist_file_ends_in_one_line(smoke):
    path = corrupt(smoke, "train-images-idx3-ubyte")
    with pytest.raises(SystemExit) as exit_info:
        common.cli(lambda: gan.main(argv(smoke, smoke / "out")))
    assert_one_line_error(exit_info, str(path), "corrupted or truncated")


@pytest.mark.parametrize("flag, value", [("--n_epochs", "0"), ("--lr", "-1"), ("--batch_size", "0"),
                                         ("--latent_dim", "0"), ("--save_interval", "0")])
def test_bad_values_are_argparse_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gan.parse_args([flag, value])
    assert exit_info.value.code == 2
    assert "must be a positive" in capsys.readouterr().err


def test_defaults_and_removed_flags():
    args = gan.parse_args([])
    assert (args.n_epochs, args.batch_size, args.lr, args.latent_dim, args.save_interval, args.out) == (
        200, None, None, 100, 500, "results/gan")
    for removed in ("--real_label", "--r1_gamma", "--ema", "--lr_decay_start"):
        with pytest.raises(SystemExit):
            gan.parse_args([removed, "1"])
