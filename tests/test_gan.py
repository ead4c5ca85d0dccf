"""The GAN's networks, losses and training steps against known answers, the speed-ups of its step
against the plain way, the library weight average and BatchNorm refresh against their closed forms,
and its command line end to end on a small fake MNIST folder."""

import copy
import dataclasses
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
from torch import nn

import a3_gan_template as gan
import evaluation
import harness
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


def plain(lr=0.0, **changes):
    """The template's settings (constant learning rate, no R1) at learning rate ``lr``."""
    return dataclasses.replace(gan.TEMPLATE, lr=lr, **changes)


def sgd(generator, discriminator, lr_g, lr_d, **changes):
    """SGD for G and D and the settings that train them at ``lr_g`` and ``lr_d``: ``train`` gives
    every optimizer settings.lr, so a network held still gets an optimizer of a stand-in parameter."""
    lr = max(lr_g, lr_d)
    assert {lr_g, lr_d} <= {0.0, lr}
    optimizers = [torch.optim.SGD(net.parameters() if rate else [nn.Parameter(torch.zeros(1))], lr=lr)
                  for net, rate in ((generator, lr_g), (discriminator, lr_d))]
    return (*optimizers, plain(lr, **changes))


def train(loader, discriminator, generator, optimizer_G, optimizer_D, settings, **kwargs):
    return gan.train(loader, discriminator, generator, optimizer_G, optimizer_D, settings=settings, **kwargs)


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


# ---------------------------------------------------------------- networks and settings

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
    assert gan.N_PIXELS == 784


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


def test_settings_default_and_the_templates():
    assert harness.settings.as_dict(gan.DEFAULT) == {
        "epochs": 200, "latent_dim": 100, "batch_size": 64, "lr": 2e-4, "adam_beta1": 0.5,
        "adam_beta2": 0.999, "r1_gamma": 0.3, "r1_interval": 8, "ema_decay": 0.999, "lr_decay_start": 0.5,
        "save_interval": 500}
    assert harness.settings.differences(gan.TEMPLATE, gan.DEFAULT) == {
        "r1_gamma": 0.0, "r1_interval": 1, "ema_decay": None, "lr_decay_start": 1.0}


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
    stats = train(TensorLoader(real, torch.zeros(n), batch_size=n), discriminator, generator,
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
    train(one_batch(n), discriminator, generator, *sgd(generator, discriminator, lr, 0.0))
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
    train(one_batch(n), discriminator, generator, *sgd(generator, discriminator, 0.0, lr))
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


def adam_pair(generator, discriminator, fused, settings=gan.DEFAULT):
    return [torch.optim.Adam(m.parameters(), lr=settings.lr, betas=(settings.adam_beta1, settings.adam_beta2),
                             fused=fused) for m in (generator, discriminator)]


def test_fused_adam_trains_as_plain_adam():
    """The script's fused Adam is a speed-up only: three steps of ``train`` (R1 on the first) give
    the parameters, batch-norm statistics and mean losses of torch's plain Adam."""
    loader = TensorLoader(real_images(96).reshape(96, 784), torch.zeros(96), batch_size=32)
    settings = dataclasses.replace(gan.DEFAULT, r1_interval=2)
    runs = []
    for fused in (True, False):
        generator, discriminator = networks()
        torch.manual_seed(1)
        stats = train(loader, discriminator, generator, *adam_pair(generator, discriminator, fused), settings)
        runs.append((generator, discriminator, stats))
    (g_fused, d_fused, stats_fused), (g_plain, d_plain, stats_plain) = runs
    loose = biases_before_batchnorm(g_fused.net)
    assert loose == {"net.2.bias", "net.5.bias", "net.8.bias"}
    loose |= {f"net.{int(name.split('.')[1]) + 1}.running_mean" for name in loose}  # the mean holds the bias
    for fused, plain_ in ((g_fused, g_plain), (d_fused, d_plain)):
        for (name, a), b in zip(fused.state_dict().items(), plain_.state_dict().values(), strict=True):
            tolerance = 3 * settings.lr if fused is g_fused and name in loose else 1e-6
            torch.testing.assert_close(a, b, rtol=0, atol=tolerance, msg=f"{name} differs")
    assert stats_fused == pytest.approx(stats_plain, rel=1e-6)
    untrained, _ = networks()
    assert (g_fused.net[0].weight - untrained.net[0].weight).abs().max() > 1e-4  # it did train


@needs_amx
def test_bf16_training_steps_follow_the_fp32_ones():
    """Three steps with bf16 training matmuls, R1 penalty included, stay close to fp32 from the same
    seed: the same mean losses to 1e-2 and generator weight matrices that moved the same way (cosine
    similarity of the updates above 0.95: Adam's first steps are about lr * sign(gradient), so
    elements whose gradient is within bf16 rounding of 0 step either way; biases are left out, as
    those before a batch norm have nothing but such gradients)."""
    loader = TensorLoader(real_images(96), torch.zeros(96), batch_size=32)
    settings = dataclasses.replace(gan.DEFAULT, r1_interval=2)
    runs = {}
    for precision in ("fp32", "bf16"):
        generator, discriminator = networks()
        weights = [p for p in generator.parameters() if p.dim() == 2]
        start = torch.nn.utils.parameters_to_vector(weights).detach().clone()
        torch.manual_seed(1)
        stats = train(loader, discriminator, generator, *adam_pair(generator, discriminator, True), settings,
                      precision=precision)
        runs[precision] = stats, torch.nn.utils.parameters_to_vector(weights).detach() - start
    (stats_fp32, update_fp32), (stats_bf16, update_bf16) = runs["fp32"], runs["bf16"]
    for key in stats_fp32:
        assert stats_bf16[key] == pytest.approx(stats_fp32[key], abs=1e-2)
    assert torch.cosine_similarity(update_bf16, update_fp32, dim=0) > 0.95
    # That the bf16 mode really rounds the matmuls' inputs is test_harness's AMX test: updates that
    # merely differ prove nothing, as the mode also changes which fp32 kernel oneDNN picks.


def test_train_runs_its_steps_in_the_precision_it_is_given(monkeypatch):
    """``train`` enters harness.matmul_precision with its ``precision`` argument, around its steps."""
    entered = []
    matmul_precision = harness.matmul_precision

    def spy(precision):
        entered.append(precision)
        return matmul_precision(precision)

    monkeypatch.setattr(harness, "matmul_precision", spy)
    generator, discriminator = networks()
    train(one_batch(8), discriminator, generator, *sgd(generator, discriminator, 0.0, 0.0), precision="bf16")
    assert entered == ["bf16"]


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
        train(TensorLoader(real, torch.zeros(n), batch_size=n), discriminator, generator,
              *sgd(generator, discriminator, lr, lr, r1_gamma=r1_gamma, r1_interval=interval))
        return generator, discriminator

    generator_plain, discriminator_plain = step(0.0)
    generator_r1, discriminator_r1 = step(gamma)
    _, reference = networks()  # D before the step: the penalty's gradient is taken there
    x = real.clone().requires_grad_(True)
    parameters = list(reference.parameters())
    penalty_grads = torch.autograd.grad(gan.r1_penalty(x, reference.logits(x)), parameters,
                                        allow_unused=True, materialize_grads=True)
    assert penalty_grads[0].abs().max() > 0
    for plain_, with_r1, grad in zip(discriminator_plain.parameters(), discriminator_r1.parameters(),
                                     penalty_grads, strict=True):
        torch.testing.assert_close(with_r1 - plain_, -lr * gamma * interval / 2 * grad, atol=1e-6, rtol=1e-4)
    for plain_, with_r1 in zip(generator_plain.parameters(), generator_r1.parameters(), strict=True):
        assert torch.equal(plain_, with_r1)


def test_lazy_r1_regularizes_every_kth_batch_only():
    """Three batches with interval 2 are the same training as: batch 0 with the penalty weighted
    twice, batch 1 without it, batch 2 with it again."""
    n, gamma, lr = 8, 3.0, 0.05
    batches = [real_images(n, seed).reshape(n, 784) for seed in range(3)]

    generator_lazy, discriminator_lazy = networks()
    torch.manual_seed(1)
    train(TensorLoader(torch.cat(batches), torch.zeros(3 * n), batch_size=n), discriminator_lazy,
          generator_lazy, *sgd(generator_lazy, discriminator_lazy, lr, lr, r1_gamma=gamma, r1_interval=2))

    generator, discriminator = networks()
    optimizer_G, optimizer_D, _ = sgd(generator, discriminator, lr, lr)
    torch.manual_seed(1)
    for batch, weight in zip(batches, (2 * gamma, 0.0, 2 * gamma), strict=True):
        train(TensorLoader(batch, torch.zeros(n), batch_size=n), discriminator, generator,
              optimizer_G, optimizer_D, plain(lr, r1_gamma=weight))
    for lazy, reference in zip(discriminator_lazy.parameters(), discriminator.parameters(), strict=True):
        torch.testing.assert_close(lazy, reference, atol=1e-6, rtol=1e-5)


def test_a_non_finite_loss_stops_the_epoch_with_a_run_error():
    generator, discriminator = networks()
    with torch.no_grad():
        discriminator.net[-1].bias.fill_(float("nan"))
    with pytest.raises(harness.RunError, match="loss became nan at epoch 3"):
        train(one_batch(8), discriminator, generator, *sgd(generator, discriminator, 0.0, 0.0), epoch=3)


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
    stats = train(TensorLoader(images, torch.zeros(24), batch_size=8), discriminator, generator,
                  *sgd(generator, discriminator, 0.0, 0.0))
    np.testing.assert_allclose([stats[k] for k in ("loss_d", "loss_g", "d_real", "d_fake")], expected,
                               rtol=1e-5)


# ---------------------------------------------------------------- weight average and BatchNorm refresh

def test_weight_average_moves_weights_by_one_minus_decay_and_copies_batchnorm_statistics():
    generator = gan.Generator()
    with torch.no_grad():
        for p in generator.parameters():
            p.fill_(1.0)
    average = gan.weight_average(generator, decay=0.75)
    assert all(torch.all(p == 1.0) for p in average.module.parameters())  # it starts at G's weights
    with torch.no_grad():
        for p in generator.parameters():
            p.fill_(3.0)
        generator.net[3].running_mean.fill_(0.5)
        generator.net[3].num_batches_tracked.fill_(7)
    average.update_parameters(generator)
    for p in average.module.parameters():
        assert torch.all(p == 1.5)  # 0.75 * 1 + 0.25 * 3
    assert torch.all(generator.net[0].weight == 3.0)  # the generator itself is untouched
    norm = average.module.net[3]
    assert torch.all(norm.running_mean == 0.5) and norm.num_batches_tracked == 7


def test_train_keeps_the_average_of_the_closed_form_after_every_generator_step():
    """Three batches: the average is the EMA sequence a_0 = G_0, a_k = decay a_{k-1} + (1 - decay) G_k
    of G's weights after each step, in closed form sum_k w_k G_k; its BatchNorm buffers are G's."""
    decay, lr = 0.5, 0.05
    images = real_images(24).reshape(24, 784)
    generator, discriminator = networks()
    average = gan.weight_average(generator, decay)
    torch.manual_seed(1)
    train(TensorLoader(images, torch.zeros(24), batch_size=8), discriminator, generator,
          *sgd(generator, discriminator, lr, lr), average=average)

    reference_g, reference_d = networks()
    optimizer_G, optimizer_D, settings = sgd(reference_g, reference_d, lr, lr)
    states = [copy.deepcopy(reference_g.state_dict())]
    torch.manual_seed(1)
    for batch in images.split(8):
        train(TensorLoader(batch, torch.zeros(8), batch_size=8), reference_d, reference_g, optimizer_G,
              optimizer_D, settings)
        states.append(copy.deepcopy(reference_g.state_dict()))
    weights = [decay ** 3, decay ** 2 * (1 - decay), decay * (1 - decay), 1 - decay]  # of G_0 ... G_3
    assert sum(weights) == pytest.approx(1)
    for name, value in average.module.state_dict().items():
        if name in dict(reference_g.named_parameters()):
            expected = sum(w * state[name] for w, state in zip(weights, states, strict=True))
        else:
            expected = states[-1][name]  # running statistics: G's, copied
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7, msg=name)
    assert not torch.allclose(average.module.net[0].weight, generator.net[0].weight)


def test_refresh_batchnorm_averages_each_batch_statistics_with_equal_weight(monkeypatch):
    monkeypatch.setattr(gan, "BN_BATCHES", 5)
    average = gan.weight_average(gan.Generator(latent_dim=8), decay=0.9)
    average.eval()
    first_linear, first_norm = average.module.net[2], average.module.net[3]
    rng_state = torch.get_rng_state()
    gan.refresh_batchnorm(average, batch_size=16)
    assert torch.equal(torch.get_rng_state(), rng_state)  # its own random stream
    assert not average.module.training and first_norm.momentum == 0.1
    z = torch.randn(5, 16, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = first_linear(average.module.net[1](average.module.net[0](z)))  # [5 batches, 16, 256]
    torch.testing.assert_close(first_norm.running_mean, hidden.mean((0, 1)))
    torch.testing.assert_close(first_norm.running_var, hidden.var(1, unbiased=True).mean(0))
    assert first_norm.num_batches_tracked == 5


def test_train_saves_interval_grids_of_the_average_counted_over_the_run(tmp_path, monkeypatch):
    generator, discriminator = networks()
    average = gan.weight_average(generator, 0.9)
    loader = TensorLoader(real_images(40), torch.zeros(40), batch_size=8)  # 5 batches
    fixed_z = torch.randn(25, 100)
    settings = dataclasses.replace(gan.DEFAULT, save_interval=2)
    optimizers = adam_pair(generator, discriminator, True, settings)
    save_image_grid, grids = harness.save_image_grid, []

    def spy(images, stem, nrow):
        torch.testing.assert_close(images, gan.generate(average.module, fixed_z))  # the average's, now
        grids.append(nrow)
        save_image_grid(images, stem, nrow)

    monkeypatch.setattr(harness, "save_image_grid", spy)
    for epoch in (1, 2):
        stats = train(loader, discriminator, generator, *optimizers, settings, epoch=epoch, average=average,
                      fixed_z=fixed_z, interval_dir=tmp_path)
        assert all(np.isfinite(v) for v in stats.values())
        assert 0 < stats["d_real"] < 1 and 0 < stats["d_fake"] < 1
    # batches are counted from 0 over the run: 0, 2, 4 in epoch 1 and 6, 8 in epoch 2 (5 per epoch)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"batch_{i:06d}.{ext}" for i in (0, 2, 4, 6, 8) for ext in ("png", "pdf"))
    assert grids == [5] * 5


# ---------------------------------------------------------------- learning rate

def old_get_lr(epoch, n_epochs, lr, decay_start):
    """The schedule before the refactor, per epoch (counted from 1), copied verbatim."""
    decay_epochs = max(1, n_epochs - int(decay_start * n_epochs))
    return lr * min(1.0, (n_epochs - epoch + 1) / decay_epochs)


@pytest.mark.parametrize("base", [gan.DEFAULT, gan.TEMPLATE], ids=["default", "template"])
@pytest.mark.parametrize("epochs", [1, 2, 3, 7, 200])
def test_get_lr_equals_the_old_per_epoch_schedule_at_every_step(base, epochs):
    settings = dataclasses.replace(base, epochs=epochs)
    steps_per_epoch = 3
    for step in range(epochs * steps_per_epoch):
        old = old_get_lr(step // steps_per_epoch + 1, epochs, settings.lr, settings.lr_decay_start)
        assert gan.get_lr(step, steps_per_epoch, settings) == old  # exactly


def test_learning_rate_decays_linearly_over_the_second_half():
    lr = gan.DEFAULT.lr
    rates = [gan.get_lr(epoch - 1, 1, gan.DEFAULT) for epoch in range(1, 201)]
    assert set(rates[:101]) == {lr}  # epochs 1-101
    assert rates[101] == pytest.approx(lr * 0.99) and rates[149] == pytest.approx(lr * 0.51)
    assert rates[-1] == pytest.approx(lr / 100)
    assert np.allclose(np.diff(rates[100:]), -lr / 100)
    three = dataclasses.replace(gan.DEFAULT, epochs=3)
    assert [gan.get_lr(step, 5, three) for step in (0, 5, 10, 14)] == [lr, lr, lr / 2, lr / 2]


def test_templates_learning_rate_is_constant():
    for epochs in (1, 2, 200):
        settings = dataclasses.replace(gan.TEMPLATE, epochs=epochs)
        assert {gan.get_lr(step, 4, settings) for step in range(4 * epochs)} == {gan.TEMPLATE.lr}


def test_train_sets_the_learning_rate_of_its_step_before_the_step():
    """In epoch 3 of 3 with decay from halfway, both optimizers step at lr / 2: G's SGD step is the
    reference step at that rate, and the optimizers keep it."""
    n, lr = 16, 0.05
    generator, discriminator = networks()
    optimizer_G, optimizer_D, _ = sgd(generator, discriminator, lr, lr)
    torch.manual_seed(1)
    train(one_batch(n), discriminator, generator, optimizer_G, optimizer_D,
          dataclasses.replace(gan.DEFAULT, lr=lr, r1_gamma=0.0, epochs=3), epoch=3)
    assert [g["lr"] for g in (*optimizer_G.param_groups, *optimizer_D.param_groups)] == [lr / 2] * 2

    reference_g, reference_d = networks()
    torch.manual_seed(1)
    gan.generator_loss(reference_d.logits(reference_g(torch.randn(n, 100)))).backward()
    for trained, reference in zip(generator.parameters(), reference_g.parameters(), strict=True):
        torch.testing.assert_close(trained, reference - lr / 2 * reference.grad, rtol=0, atol=1e-7)


def test_milestones_mark_halfway_and_the_first_epoch_of_a_lower_learning_rate():
    assert gan.milestones(gan.DEFAULT) == {"halfway": 100, "lr_decay_start": 102}
    assert gan.milestones(dataclasses.replace(gan.DEFAULT, epochs=3)) == {"halfway": 1, "lr_decay_start": 3}
    assert gan.milestones(gan.TEMPLATE) == {"halfway": 100}  # constant: no decay to mark


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
    monkeypatch.setattr(gan, "EVALUATION_SAMPLES", 50)
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
        torch.testing.assert_close(images, gan.sample_images(networks(seed=epoch)[0], 50))
    assert rows[0] == {"epoch": 1, "fid": calls[0][0].mean().item(), "score": 1.0}
    for name, tensor in generator.state_dict().items():
        assert torch.equal(tensor, current[name])
    assert len(log) == 2 and "selection reference" in log[0]


def test_load_sampler_samples_from_the_weight_average_when_there_is_one(tmp_path):
    trained, average = networks(seed=1)[0], networks(seed=2)[0]
    for state, expected in (({"generator": trained.state_dict(), "generator_average": average.state_dict()},
                             average), ({"generator": trained.state_dict()}, trained)):
        path = tmp_path / "checkpoint.pt"
        settings = harness.settings.as_dict(gan.DEFAULT)
        torch.save({"settings": settings, "seed": 42, "state": state, "epoch": 3}, path)
        torch.testing.assert_close(gan.load_sampler(path)(20, seed=3), gan.sample_images(expected, 20, 3))


# ---------------------------------------------------------------- command line

@pytest.fixture
def smoke(fake_mnist, small_splits, monkeypatch):
    """The script on the fake MNIST folder with its real data, evaluation and classifier code, at
    small sizes: 200 samples where it draws 10,000, 100 candidates for the interpolation ends, 4
    batches for the weight average's batch-norm statistics."""
    monkeypatch.setattr(gan, "EVALUATION_SAMPLES", 200)
    monkeypatch.setattr(gan, "BN_BATCHES", 4)
    monkeypatch.setattr(gan, "find_digit_pairs", functools.partial(gan.find_digit_pairs, n_candidates=100))
    return fake_mnist.root


def argv(root, out, *flags):
    return ["--save_interval", "2", "--device", "cpu", "--data_root", str(root), "--out", str(out), *flags]


def run_main(root, out, *flags):
    gan.main(argv(root, out, *flags))
    return json.loads((out / "metrics.json").read_text())


def test_smoke_run_writes_every_output_and_resuming_it_reproduces_the_numbers(smoke, capsys):
    out = smoke / "gan"
    metrics = run_main(smoke, out, "--n_epochs", "3", "--batch_size", "32", "--resume")

    expected = {f"{stem}.{ext}" for stem in gan.FIGURES.values() for ext in ("png", "pdf")}
    assert {p.name for p in out.iterdir()} == expected | {"intervals", "metrics.json", "checkpoint.pt",
                                                          "weights.pt", "train.log"}
    # 4 batches per epoch (120 images), a grid every 2 batches counted over the run
    assert sorted(p.name for p in (out / "intervals").iterdir()) == sorted(
        f"batch_{i:06d}.{ext}" for i in range(0, 12, 2) for ext in ("png", "pdf"))

    settings = dataclasses.replace(gan.DEFAULT, epochs=3, batch_size=32, save_interval=2)
    assert metrics["settings"] == harness.settings.as_dict(settings)
    assert metrics["epochs_completed"] == 3 and metrics["seed"] == 42
    assert metrics["milestones"] == {"halfway": 1, "lr_decay_start": 3}
    assert metrics["figures"] == gan.FIGURES
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
        assert group["lr"] == gan.get_lr(2 * 4, 4, settings) == 1e-4  # decayed in epoch 3
    average = gan.Generator()
    average.load_state_dict(saved["state"]["generator_average"])  # a plain Generator's keys, as before
    torch.testing.assert_close(gan.load_sampler(out / "checkpoint.pt")(8), gan.sample_images(average, 8))

    resume = ("--n_epochs", "3", "--batch_size", "32", "--resume")
    assert_resume_keeps_the_run(lambda: run_main(smoke, out, *resume), out, metrics, capsys)
    assert len(list((out / "intervals").iterdir())) == 12

    assert_refused_in_one_line(lambda: gan.main(argv(smoke, out, "--n_epochs", "3", "--resume")),
                               "batch_size=32 (asked: 64)")

    # From the averaged generator's weights alone: the same numbers; the progress curve is kept.
    rebuild = ("--n_epochs", "3", "--batch_size", "32", "--from_weights")
    assert_rebuild_reproduces_the_run(lambda: run_main(smoke, out, *rebuild), out, metrics)
    assert set(torch.load(out / "weights.pt", weights_only=True)) == {"generator_average", "fixed_z"}


def test_template_flag_trains_the_templates_way_and_set_reaches_the_model(smoke, monkeypatch):
    calls = {"mnist_gan": [], "train": []}
    mnist_gan, train_ = gan.mnist_gan, gan.train
    monkeypatch.setattr(gan, "mnist_gan", lambda *args, **kwargs: calls["mnist_gan"].append(kwargs)
                        or mnist_gan(*args, **kwargs))
    monkeypatch.setattr(gan, "train", lambda *args, **kwargs: calls["train"].append(kwargs)
                        or train_(*args, **kwargs))
    out = smoke / "template"
    metrics = run_main(smoke, out, "--template", "--n_epochs", "2", "--set", "latent_dim=16")

    settings = dataclasses.replace(gan.TEMPLATE, epochs=2, save_interval=2, latent_dim=16)
    assert metrics["settings"] == harness.settings.as_dict(settings)
    assert metrics["milestones"] == {"halfway": 1}
    assert calls["mnist_gan"] == [{"batch_size": 64}]
    assert [kwargs["epoch"] for kwargs in calls["train"]] == [1, 2]
    for kwargs in calls["train"]:
        assert kwargs["average"] is None and kwargs["settings"] == settings
        assert kwargs["precision"] == metrics["training_precision"]
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert "generator_average" not in saved["state"]  # samples come from G itself
    for name in ("optimizer_G", "optimizer_D"):
        assert saved["state"][name]["param_groups"][0]["lr"] == 2e-4  # constant, also in the last epoch
    generator = gan.Generator(latent_dim=16)  # --set latent_dim=16 reached the model
    generator.load_state_dict(saved["state"]["generator"])
    torch.testing.assert_close(gan.load_sampler(out / "checkpoint.pt")(8), gan.sample_images(generator, 8))
    assert set(torch.load(out / "weights.pt", weights_only=True)) == {"generator", "fixed_z"}
    assert [row["epoch"] for row in metrics["progress"]] == [1, 2]


def test_a_corrupted_mnist_file_ends_in_one_line(smoke):
    path = corrupt(smoke, "train-images-idx3-ubyte")
    with pytest.raises(SystemExit) as exit_info:
        harness.cli(lambda: gan.main(argv(smoke, smoke / "out")))
    assert_one_line_error(exit_info, str(path), "corrupted or truncated")


@pytest.mark.parametrize("flag, value", [("--n_epochs", "0"), ("--lr", "-1"), ("--batch_size", "0"),
                                         ("--latent_dim", "0"), ("--save_interval", "0")])
def test_bad_values_are_argparse_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gan.parse_args([flag, value])
    assert exit_info.value.code == 2
    assert "must be a positive" in capsys.readouterr().err


@pytest.mark.parametrize("assignment", ["epochs=0", "r1_interval=0", "batch_size=0"])
def test_a_non_positive_setting_ends_in_one_line(assignment, fake_mnist_root, tmp_path):
    assert_refused_in_one_line(lambda: gan.main(argv(fake_mnist_root, tmp_path / "out", "--set", assignment)),
                               f"setting {assignment.split('=')[0]} must be positive")


def resolve(*flags):
    return harness.settings.resolve(gan.parse_args(list(flags)), gan.DEFAULT, gan.TEMPLATE)


def test_the_templates_flags_set_their_fields_as_set_does():
    args = gan.parse_args([])
    assert (args.n_epochs, args.batch_size, args.lr, args.latent_dim, args.save_interval, args.out) == (
        None, None, None, None, None, "results/gan")
    assert resolve() == gan.DEFAULT and resolve("--template") == gan.TEMPLATE
    flags = ("--n_epochs", "5", "--batch_size", "16", "--lr", "1e-3", "--latent_dim", "8",
             "--save_interval", "7")
    sets = ("epochs=5", "batch_size=16", "lr=1e-3", "latent_dim=8", "save_interval=7")
    assert resolve(*flags) == resolve(*(f for s in sets for f in ("--set", s))) == dataclasses.replace(
        gan.DEFAULT, epochs=5, batch_size=16, lr=1e-3, latent_dim=8, save_interval=7)
    assert resolve("--template", "--lr", "1e-3") == dataclasses.replace(gan.TEMPLATE, lr=1e-3)
    assert resolve("--n_epochs", "5", "--set", "epochs=7").epochs == 7  # --set wins


def test_removed_flags_are_settings_now():
    for removed in ("--real_label", "--r1_gamma", "--ema", "--lr_decay_start"):
        with pytest.raises(SystemExit):
            gan.parse_args([removed, "1"])
    template_way = resolve("--set", "r1_gamma=0", "--set", "ema_decay=none", "--set", "lr_decay_start=1")
    assert (template_way.r1_gamma, template_way.ema_decay, template_way.lr_decay_start) == (0.0, None, 1.0)
