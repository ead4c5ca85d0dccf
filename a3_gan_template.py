"""Part 2: a Generative Adversarial Network on MNIST (assignment questions 2.4-2.7).

The generator and discriminator are the template's MLPs. The discriminator returns the probability of
"real" from ``forward``; the losses use its logits, so log D and log(1 - D) are log-sigmoids and never
log(0). Training follows the template, Adam with betas=(0.5, 0.999) for both networks and 200 epochs
over all 60,000 training images scaled to [-1, 1], but at twice its batch and learning rate (128 and
4e-4 instead of 64 and 2e-4): as good samples in about 60% of the time on a CPU (results/gan/README.md;
``--batch_size 64 --lr 0.0002`` gives the template's). Three additions, all switchable, keep
training from drifting away from good, class-balanced samples: an R1 gradient penalty on the
discriminator (Mescheder et al., 2018), applied lazily on every 8th batch, without which D slowly
wins, the fakes get worse after epoch 50 and some digits crowd out others; learning rates that decay
linearly to zero over the second half of training; and samples drawn from an exponential
moving average of the generator's weights (Yazici et al., 2019), which smooths out the oscillation
of adversarial training, with batch-norm statistics recomputed for the averaged weights.

    python a3_gan_template.py                 # full run into results/gan/
    python a3_gan_template.py --resume        # continue an interrupted run (or redraw a finished one)
"""

import argparse
import copy
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import save_image
from tqdm import tqdm

import common
from datasets.mnist import mnist_gan

PROGRESS_EPOCHS = (1, 5, 10, 25, 50, 100, 150)  # plus the last: when to keep G for the metrics curve
INTERPOLATION_PAIRS = ((1, 7), (3, 8), (0, 6), (4, 9), (2, 5), (5, 3))


# ---------------------------------------------------------------- model

class Generator(nn.Module):
    """z [B, latent_dim] ~ N(0, I)  ->  image [B, 784] in [-1, 1]."""

    def __init__(self, latent_dim=100):
        super().__init__()
        self.latent_dim = latent_dim
        self.net = nn.Sequential(
            nn.Linear(latent_dim, 128), nn.LeakyReLU(0.2),
            nn.Linear(128, 256), nn.BatchNorm1d(256), nn.LeakyReLU(0.2),
            nn.Linear(256, 512), nn.BatchNorm1d(512), nn.LeakyReLU(0.2),
            nn.Linear(512, 1024), nn.BatchNorm1d(1024), nn.LeakyReLU(0.2),
            nn.Linear(1024, 784), nn.Tanh(),
        )

    def forward(self, z):
        return self.net(z)


class Discriminator(nn.Module):
    """image [B, 784] or [B, 1, 28, 28]  ->  D(x), the probability that x is real."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(784, 512), nn.LeakyReLU(0.2),
            nn.Linear(512, 256), nn.LeakyReLU(0.2),
            nn.Linear(256, 1),
        )

    def logits(self, img):
        # float(): under bf16 autocast (--precision bf16 on a GPU) the last layer's output is bf16;
        # the losses and the R1 penalty are computed in fp32.
        return self.net(img.reshape(len(img), 784)).squeeze(1).float()

    def forward(self, img):
        return torch.sigmoid(self.logits(img))


# ---------------------------------------------------------------- losses

def discriminator_loss(real_logits, fake_logits, real_label=1.0):
    """-[log D(x) + log(1 - D(G(z)))], the binary cross-entropy of real vs generated (eq. of Q2.2).

    With D = sigmoid(l): -log D = softplus(-l) and -log(1 - D) = softplus(l). A ``real_label`` below 1
    is one-sided label smoothing (Salimans et al., 2016): the target for real images becomes
    ``real_label``, which keeps D from growing overconfident.
    """
    real_term = real_label * F.softplus(-real_logits) + (1 - real_label) * F.softplus(real_logits)
    return real_term.mean() + F.softplus(fake_logits).mean()


def r1_penalty(real, real_logits):
    """R1 = E_x ||grad_x D_logit(x)||^2 on real images (Mescheder et al., 2018): it pushes D's
    surface flat around the data, so D cannot keep sharpening against G, the drift that otherwise
    degrades samples late in training. ``real`` must have required grad before ``real_logits``."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.square().sum(1).mean()


def generator_loss(fake_logits):
    """The non-saturating loss -log D(G(z)) (Q2.4): strong gradients when D rejects the fakes early
    on, where the minimax loss log(1 - D(G(z))) saturates."""
    return F.softplus(-fake_logits).mean()


# ---------------------------------------------------------------- training

@torch.no_grad()
def update_average(average, generator, decay):
    """average <- decay * average + (1 - decay) * generator, weight by weight; BatchNorm statistics
    are copied, as they already are running averages."""
    torch._foreach_lerp_(list(average.parameters()), list(generator.parameters()), 1 - decay)
    torch._foreach_copy_(list(average.buffers()), list(generator.buffers()))


def train(dataloader, discriminator, generator, optimizer_G, optimizer_D, *, epoch=0,
          save_interval=None, interval_dir=None, fixed_z=None, average=None, ema_decay=0.999,
          real_label=1.0, r1_gamma=0.0, r1_interval=1, precision="fp32"):
    """One epoch over ``dataloader``; returns the mean D and G losses and mean D(x), D(G(z)).

    ``average``, if given, is a copy of the generator that tracks the moving average of its weights.
    ``r1_gamma`` > 0 adds the R1 penalty (gamma / 2) * R1 to the discriminator's loss, and so to the
    mean D loss returned. With ``r1_interval`` k > 1 it is lazy (Karras et al., 2020): the penalty,
    weighted k times, is added on every k-th batch only, which saves most of its double backward.
    Every ``save_interval`` batches (counted over the whole run) a 5x5 grid of the average (or the
    generator) at ``fixed_z`` goes to ``interval_dir``. The training steps' matmuls run in
    ``precision`` (see ``common.bf16_matmuls``). Statistics accumulate on the device and are read
    once per epoch.
    """
    device = next(generator.parameters()).device
    generator.train()
    discriminator.train()
    totals = torch.zeros(4, device=device)
    for i, (imgs, _) in enumerate(tqdm(dataloader, desc=f"epoch {epoch}", leave=False, disable=None)):
        with common.bf16_matmuls(precision, device):
            real = imgs.to(device, non_blocking=True).reshape(len(imgs), 784)
            z = torch.randn(len(real), generator.latent_dim, device=device)
            gen_imgs = generator(z)

            # Generator step: make D call the fakes real. D is frozen for it, as the gradients of its
            # weights would be thrown away: the backward then skips their matmuls.
            discriminator.requires_grad_(False)
            fake_logits = discriminator.logits(gen_imgs)
            loss_g = generator_loss(fake_logits)
            optimizer_G.zero_grad(set_to_none=True)
            loss_g.backward()
            optimizer_G.step()
            discriminator.requires_grad_(True)
            if average is not None:
                update_average(average, generator, ema_decay)

            # Discriminator step, on the same fakes, detached so no gradient reaches G. D has no batch
            # norm, so one pass over real and fake images together gives the logits of two passes with
            # half the layer calls.
            regularize = r1_gamma > 0 and i % r1_interval == 0
            real.requires_grad_(regularize)
            real_logits, fake_logits = discriminator.logits(torch.cat([real, gen_imgs.detach()])).chunk(2)
            loss_d = discriminator_loss(real_logits, fake_logits, real_label)
            if regularize:
                loss_d = loss_d + r1_gamma * r1_interval / 2 * r1_penalty(real, real_logits)
            optimizer_D.zero_grad(set_to_none=True)
            loss_d.backward()
            optimizer_D.step()

        with torch.no_grad():
            totals += torch.stack([loss_d, loss_g, torch.sigmoid(real_logits).mean(),
                                   torch.sigmoid(fake_logits).mean()])
        batches_done = epoch * len(dataloader) + i
        if save_interval and batches_done % save_interval == 0:
            save_samples_png(average or generator, fixed_z,
                             Path(interval_dir) / f"batch_{batches_done:06d}.png")
    totals = (totals / len(dataloader)).tolist()
    common.check_finite(torch.tensor(totals[:2]).sum(), f"epoch {epoch}")
    return dict(zip(("loss_d", "loss_g", "d_real", "d_fake"), totals, strict=True))


# ---------------------------------------------------------------- sampling, interpolation, plots

@torch.no_grad()
def recompute_batchnorm(generator, n_batches=200, batch_size=64, seed=0):
    """Precise BatchNorm (Wu & Johnson, 2021): the running statistics, reset and then averaged with
    equal weight over ``n_batches`` batches of fresh z. What sampling uses otherwise are G's
    statistics, measured under G's weights, not the average's, and with momentum 0.1 mostly over
    the last ten batches. On the final weight average of the R1 run this took FID from 19.9 to 15.8."""
    device = next(generator.parameters()).device
    norms = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    was_training = generator.training
    generator.train()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
    z = torch.randn(n_batches, batch_size, generator.latent_dim,
                    generator=torch.Generator().manual_seed(seed))
    for batch in z:
        generator(batch.to(device))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    generator.train(was_training)


@torch.inference_mode()
def generate(generator, z):
    """G(z) mapped to [0, 1] as [B, 784] on the CPU, with BatchNorm in inference mode."""
    was_training = generator.training
    generator.eval()
    images = (generator(z) + 1) / 2
    generator.train(was_training)
    return images.clamp_(0, 1).cpu()


def save_samples_png(generator, z, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(generate(generator, z).reshape(-1, 1, 28, 28), path, nrow=5, padding=2, pad_value=1.0)


def interpolate(z_start, z_end, steps=7):
    """``steps`` latent vectors evenly between the two ends, with both ends: [steps + 2, latent_dim]."""
    weights = torch.linspace(0, 1, steps + 2, device=z_start.device)[:, None]
    return (1 - weights) * z_start + weights * z_end


def find_digit_pairs(generator, classifier, device, pairs=INTERPOLATION_PAIRS, n_candidates=2000):
    """For each digit pair (a, b), the latent vectors among ``n_candidates`` whose samples the
    classifier finds most surely an a and a b. Returns (z_a, z_b, a, b, p_a, p_b) per pair."""
    z = torch.randn(n_candidates, generator.latent_dim, device=device)
    with torch.inference_mode():
        probs = torch.softmax(classifier(generate(generator, z).to(device)), dim=1)
    confidence, best = probs.max(0)
    return [(z[best[a]], z[best[b]], a, b, confidence[a].item(), confidence[b].item()) for a, b in pairs]


def save_interpolations(generator, classifier, out, device):
    """Q2.7: one row of 9 images between two different digits, and a figure of several rows."""
    pairs = find_digit_pairs(generator, classifier, device)
    rows = [generate(generator, interpolate(z_a, z_b)) for z_a, z_b, *_ in pairs]
    labels = [f"{a}→{b}" for _, _, a, b, _, _ in pairs]
    common.save_image_grid(rows[0], out / "interpolation", nrow=9,
                           title=f"Interpolation from a {labels[0][0]} to a {labels[0][-1]}, 7 steps")
    common.save_image_grid(torch.cat(rows), out / "interpolations", nrow=9, row_labels=labels,
                           title="Latent interpolations between samples of different digits")
    return [{"digits": [a, b], "classifier_confidence": [p_a, p_b]} for _, _, a, b, p_a, p_b in pairs]


def save_loss_plot(curves, stem, r1_gamma=0.0):
    """Per-epoch losses and the discriminator's mean outputs, side by side; the D loss includes the
    R1 term when the run had one."""
    epochs = range(1, len(curves["loss_d"]) + 1)
    fig, (ax_loss, ax_d) = plt.subplots(1, 2, figsize=(9, 3.2), layout="constrained")
    r1_term = f" $+ \\frac{{{r1_gamma:g}}}{{2}} R_1$" if r1_gamma > 0 else ""
    ax_loss.plot(epochs, curves["loss_d"], label="discriminator  $-\\log D(x) - \\log(1-D(G(z)))$" + r1_term)
    ax_loss.plot(epochs, curves["loss_g"], label="generator  $-\\log D(G(z))$")
    ax_loss.set_ylabel("mean loss per batch")
    ax_d.plot(epochs, curves["d_real"], label="$D(x)$, real")
    ax_d.plot(epochs, curves["d_fake"], label="$D(G(z))$, generated")
    ax_d.axhline(0.5, color="gray", linestyle=":", linewidth=1)
    ax_d.set_ylabel("mean discriminator output")
    for ax in (ax_loss, ax_d):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    common.save_figure(fig, stem)


# ---------------------------------------------------------------- main

def sample_images(generator, n, seed=0):
    """``n`` images [n, 784] in [0, 1] from latent vectors drawn with ``seed``, 1,000 at a time."""
    device = next(generator.parameters()).device
    z = torch.randn(n, generator.latent_dim, generator=torch.Generator().manual_seed(seed))
    return torch.cat([generate(generator, chunk.to(device)) for chunk in z.split(1000)])


def load_sampler(checkpoint_path, device="cpu"):
    """For the evaluation package: ``sample(n)`` -> [n, 784] images in [0, 1] from the generator
    that the run samples from (the weight average, when the run kept one)."""
    payload = torch.load(checkpoint_path, map_location=device, weights_only=False)
    generator = Generator(payload["args"]["latent_dim"]).to(device)
    generator.load_state_dict(payload.get("generator_average") or payload["generator"])

    return lambda n, seed=0: sample_images(generator, n, seed)


def evaluate_progress(generator, snapshots, classifier, root, device, log=print):
    """The evaluation package's metrics for the generator kept at each progress epoch."""
    import evaluation

    progress = []
    current = {k: v.clone() for k, v in generator.state_dict().items()}
    for epoch, state in sorted(snapshots.items()):
        generator.load_state_dict(state)
        row = evaluation.evaluate_samples(sample_images(generator, 10_000), root=root, device=device,
                                          classifier=classifier)
        log(f"epoch {epoch}: FID {row['fid']:.2f}  score {row['score']:.2f}  "
            f"Parzen {row['parzen_ll']:.1f}")
        progress.append({"epoch": epoch, **row})
    generator.load_state_dict(current)
    return progress


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_epochs", type=common.positive_int, default=200, help="number of epochs")
    parser.add_argument("--batch_size", type=common.positive_int, default=128,
                        help="batch size (the template's is 64)")
    parser.add_argument("--lr", type=common.positive_float, default=0.0004,
                        help="Adam learning rate (the template's is 0.0002)")
    parser.add_argument("--latent_dim", type=common.positive_int, default=100, help="dimension of z")
    parser.add_argument("--save_interval", type=common.positive_int, default=500,
                        help="save a 5x5 sample grid every this many batches")
    parser.add_argument("--lr_decay_start", type=common.unit_interval, default=0.5,
                        help="fraction of training after which both learning rates decay linearly "
                             "to 0 (1 = constant learning rate, as in the template)")
    parser.add_argument("--ema", type=common.unit_interval, default=0.999,
                        help="decay of the moving average of the generator's weights that samples "
                             "are drawn from, per step (0 = sample from the generator itself)")
    parser.add_argument("--real_label", type=common.unit_interval, default=1.0,
                        help="target of the discriminator for real images (< 1: one-sided label "
                             "smoothing)")
    parser.add_argument("--r1_gamma", type=common.non_negative_float, default=0.3,
                        help="weight gamma of the R1 gradient penalty gamma/2 E||grad D(x)||^2 on "
                             "real images (0 = none)")
    parser.add_argument("--r1_interval", type=common.positive_int, default=8,
                        help="apply the R1 penalty, weighted this many times, every this many "
                             "batches (lazy regularization; 1 = every batch)")
    common.add_precision_arg(parser)
    return common.add_common_args(parser, out="results/gan").parse_args(argv)


def make_optimizers(generator, discriminator, args):
    """Adam(lr, betas=(0.5, 0.999)) for each network, as in the template; fused=True does each update
    in one kernel, which cuts the step of these small MLPs by a third on a CPU."""
    return tuple(torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.5, 0.999), fused=True)
                 for net in (generator, discriminator))


def training_options(args, device):
    """The keyword arguments of ``train`` that the flags set."""
    return {"ema_decay": args.ema, "real_label": args.real_label, "r1_gamma": args.r1_gamma,
            "r1_interval": args.r1_interval,
            "precision": common.training_precision(args.precision, device)}


def main(argv=None):
    args = parse_args(argv)
    device, root = common.setup(args)
    out = Path(args.out)
    dataloader = mnist_gan(root, batch_size=args.batch_size)

    generator = Generator(args.latent_dim).to(device)
    discriminator = Discriminator().to(device)
    optimizer_G, optimizer_D = make_optimizers(generator, discriminator, args)
    decay_start = int(args.lr_decay_start * args.n_epochs)
    lr_factor = lambda epoch: min(1.0, (args.n_epochs - epoch) / max(1, args.n_epochs - decay_start))
    scheduler_G = torch.optim.lr_scheduler.LambdaLR(optimizer_G, lr_factor)
    scheduler_D = torch.optim.lr_scheduler.LambdaLR(optimizer_D, lr_factor)
    # What samples come from: the moving average of G's weights, or G itself.
    average = copy.deepcopy(generator) if args.ema > 0 else None
    sampler = average or generator
    fixed_z = torch.randn(25, args.latent_dim, device=device)
    curves = {"loss_d": [], "loss_g": [], "d_real": [], "d_fake": [], "wall_time_s": []}
    snapshots, stopwatch, start = {}, common.Stopwatch(), 0
    checkpoint = out / "checkpoint.pt"
    resuming = args.resume and checkpoint.exists()
    log = common.run_log(out, fresh=not resuming)
    if resuming:
        state = common.load_checkpoint(checkpoint, device, generator=generator,
                                       discriminator=discriminator, optimizer_G=optimizer_G,
                                       optimizer_D=optimizer_D, scheduler_G=scheduler_G,
                                       scheduler_D=scheduler_D,
                                       **({"generator_average": average} if average else {}))
        start, curves, snapshots = state["epoch"], state["curves"], state["snapshots"]
        fixed_z = state["fixed_z"]
        stopwatch = common.Stopwatch(state["stopwatch"])
        log(f"resumed from {checkpoint} after epoch {start}")
    info = common.run_info(args, device)
    options = training_options(args, device)
    log(f"training matmuls in {options['precision']} on {device}")
    halfway = args.n_epochs // 2
    if start == 0:
        common.save_image_grid(generate(sampler, fixed_z), out / "samples_start", nrow=5,
                               title="Before training")

    for epoch in range(start, args.n_epochs):
        with stopwatch:
            stats = train(dataloader, discriminator, generator, optimizer_G, optimizer_D, epoch=epoch,
                          save_interval=args.save_interval, interval_dir=out / "intervals",
                          fixed_z=fixed_z, average=average, **options)
        scheduler_G.step()
        scheduler_D.step()
        stopwatch.count(len(dataloader.dataset))
        for key, value in stats.items():
            curves[key].append(value)
        curves["wall_time_s"].append(stopwatch.seconds)
        done = epoch + 1
        log(f"epoch {done}/{args.n_epochs}  loss D {stats['loss_d']:.3f}  G {stats['loss_g']:.3f}  "
            f"D(x) {stats['d_real']:.3f}  D(G(z)) {stats['d_fake']:.3f}  "
            f"{stopwatch.images_per_second:.0f} img/s")
        if done in PROGRESS_EPOCHS or done in (halfway, args.n_epochs):
            recompute_batchnorm(sampler, batch_size=args.batch_size)
            snapshots[done] = {k: v.detach().clone() for k, v in sampler.state_dict().items()}
        if done == halfway:
            common.save_image_grid(generate(sampler, fixed_z), out / "samples_halfway", nrow=5,
                                   title=f"After {done} of {args.n_epochs} epochs")
        common.save_checkpoint(checkpoint, generator=generator, discriminator=discriminator,
                               optimizer_G=optimizer_G, optimizer_D=optimizer_D, scheduler_G=scheduler_G,
                               scheduler_D=scheduler_D, generator_average=average, epoch=done,
                               curves=curves, snapshots=snapshots, fixed_z=fixed_z,
                               stopwatch=stopwatch.state(), args=vars(args))

    common.save_image_grid(generate(sampler, fixed_z), out / "samples_end", nrow=5,
                           title=f"After {args.n_epochs} epochs")
    save_loss_plot(curves, out / "losses", args.r1_gamma)
    metrics = {
        **info,
        "n_params": sum(p.numel() for m in (generator, discriminator) for p in m.parameters()),
        "n_params_generator": sum(p.numel() for p in generator.parameters()),
        "training_precision": options["precision"],
        "epochs_completed": len(curves["loss_d"]),
        "optimizer": (f"Adam(lr={args.lr:g}, betas=(0.5, 0.999)) for G and D, linear decay to 0 from "
                      f"epoch {decay_start}; R1 penalty gamma={args.r1_gamma:g} on D; samples from a "
                      f"weight average with decay {args.ema:g}"),
        "curves": curves,
        "wall_time_s": stopwatch.seconds,
        "images_per_s": stopwatch.images_per_second,
    }
    try:
        from evaluation.classifier import load_classifier
    except ImportError:
        log("evaluation package not available: skipping interpolation and metrics")
    else:
        classifier = load_classifier(root, device)
        metrics["interpolation_digits"] = save_interpolations(sampler, classifier, out, device)
        metrics["progress"] = evaluate_progress(sampler, snapshots, classifier, root, device, log)
        metrics["evaluation"] = metrics["progress"][-1]
    common.write_json(out / "metrics.json", metrics)
    log(f"done: {stopwatch.seconds / 60:.1f} min of training, {stopwatch.images_per_second:.0f} img/s; "
          f"outputs in {out}")
    return metrics


if __name__ == "__main__":
    main()
