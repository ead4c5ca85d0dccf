"""Part 2: a generative adversarial network on MNIST (assignment questions 2.4-2.7).

    python a3_gan_template.py                 # 200 epochs into results/gan/
    python a3_gan_template.py --template      # the course template's training

The template's MLPs (Goodfellow et al., 2014) trained on all 60,000 training images scaled to
[-1, 1]: the discriminator by binary cross-entropy on real against generated images, the generator
by the non-saturating loss -log D(G(z)), both with Adam, betas (0.5, 0.999), for 200 epochs. Beyond
the template, to keep training from drifting away from good, class-balanced samples:

- an R1 gradient penalty on the discriminator (Mescheder et al., 2018), applied lazily on every 8th
  batch (Karras et al., 2020);
- samples drawn from an exponential moving average of the generator's weights (Yazici et al., 2019),
  with batch-norm statistics recomputed for the averaged weights;
- learning rates that decay linearly to 0 over the second half of training;
- batches of 128 at a learning rate of 4e-4 instead of 64 at 2e-4: the same samples in fewer steps.

``--template`` turns all four off (batch 64, learning rate 2e-4, constant, samples from G itself).
Outputs in --out (PNG + PDF): ``samples_{start,halfway,end}``, ``losses`` (the losses and mean D(x),
D(G(z)) per epoch), ``interpolation`` and ``interpolations`` (question 2.7), a 5x5 grid every
--save_interval batches in ``intervals/``, and ``metrics.json`` with the sample measures of
``evaluation`` during training (against a fixed subset of the training images, for choosing
settings) and at the end (against the test set).
"""

import copy

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import save_image
from tqdm import tqdm

import common
import evaluation
from datasets.mnist import mnist_gan
from evaluation.classifier import load_classifier

# Our training, and the course template's, which --template restores.
OURS = {"batch_size": 128, "lr": 4e-4, "r1_gamma": 0.3, "r1_interval": 8, "ema_decay": 0.999,
        "lr_decay_start": 0.5}
TEMPLATE = {"batch_size": 64, "lr": 2e-4, "r1_gamma": 0.0, "r1_interval": 1, "ema_decay": None,
            "lr_decay_start": 1.0}
PROGRESS_EPOCHS = (1, 5, 10, 25, 50, 100, 150)  # plus halfway and the last: the measures' curve
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
        """The logit l of D(x) = sigmoid(l): what the losses use, so that log D is a log-sigmoid."""
        return self.net(img.reshape(len(img), 784)).squeeze(1)

    def forward(self, img):
        return torch.sigmoid(self.logits(img))


# ---------------------------------------------------------------- losses

def discriminator_loss(real_logits, fake_logits):
    """-[log D(x) + log(1 - D(G(z)))], the binary cross-entropy of real against generated images
    (question 2.2). With D = sigmoid(l): -log D = softplus(-l) and -log(1 - D) = softplus(l)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def r1_penalty(real, real_logits):
    """R1 = E_x ||grad_x D_logit(x)||^2 on real images (Mescheder et al., 2018): it flattens D's
    surface around the data, so D cannot keep sharpening against G, which otherwise degrades the
    samples late in training. ``real`` must have required grad before ``real_logits``."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.square().sum(1).mean()


def generator_loss(fake_logits):
    """The non-saturating loss -log D(G(z)) (question 2.4): strong gradients when D rejects the fakes
    early on, where the minimax loss log(1 - D(G(z))) saturates."""
    return F.softplus(-fake_logits).mean()


# ---------------------------------------------------------------- training

@torch.no_grad()
def update_average(average, generator, decay):
    """average <- decay * average + (1 - decay) * generator, weight by weight; BatchNorm statistics
    are copied, as they already are running averages."""
    torch._foreach_lerp_(list(average.parameters()), list(generator.parameters()), 1 - decay)
    torch._foreach_copy_(list(average.buffers()), list(generator.buffers()))


def train(dataloader, discriminator, generator, optimizer_G, optimizer_D, *, epoch=1,
          save_interval=None, interval_dir=None, fixed_z=None, average=None, ema_decay=0.999,
          r1_gamma=0.0, r1_interval=1):
    """One epoch over ``dataloader``; returns the mean D and G losses and mean D(x), D(G(z)).

    ``average``, if given, is a copy of the generator that tracks the moving average of its weights.
    ``r1_gamma`` > 0 adds the R1 penalty (gamma / 2) * R1 to the discriminator's loss, and so to the
    mean D loss returned. With ``r1_interval`` k > 1 it is lazy (Karras et al., 2020): the penalty,
    weighted k times, is added on every k-th batch only, which saves most of its double backward.
    Every ``save_interval`` batches (counted over the whole run) a 5x5 grid of the average (or the
    generator) at ``fixed_z`` goes to ``interval_dir``.
    """
    device = next(generator.parameters()).device
    generator.train()
    discriminator.train()
    totals = torch.zeros(4, device=device)
    for i, (imgs, _) in enumerate(tqdm(dataloader, desc=f"epoch {epoch}", leave=False, disable=None)):
        real = imgs.to(device, non_blocking=True).reshape(len(imgs), 784)
        z = torch.randn(len(real), generator.latent_dim, device=device)
        gen_imgs = generator(z)

        # ---- Generator step: minimise -log D(G(z)), i.e. make D call the fakes real. D is frozen,
        # so the backward pass skips the gradients of its weights, which this step would discard.
        discriminator.requires_grad_(False)
        fake_logits = discriminator.logits(gen_imgs)
        loss_g = generator_loss(fake_logits)
        optimizer_G.zero_grad(set_to_none=True)
        loss_g.backward()
        optimizer_G.step()
        discriminator.requires_grad_(True)
        if average is not None:
            update_average(average, generator, ema_decay)

        # ---- Discriminator step: minimise -[log D(x) + log(1 - D(G(z)))] (+ R1), on the same fakes,
        # detached so that no gradient reaches G. D has no batch norm, so one pass over real and fake
        # images together gives the logits of two passes.
        regularize = r1_gamma > 0 and i % r1_interval == 0
        real.requires_grad_(regularize)
        real_logits, fake_logits = discriminator.logits(torch.cat([real, gen_imgs.detach()])).chunk(2)
        loss_d = discriminator_loss(real_logits, fake_logits)
        if regularize:
            loss_d = loss_d + r1_gamma * r1_interval / 2 * r1_penalty(real, real_logits)
        optimizer_D.zero_grad(set_to_none=True)
        loss_d.backward()
        optimizer_D.step()

        with torch.no_grad():
            totals += torch.stack([loss_d, loss_g, torch.sigmoid(real_logits).mean(),
                                   torch.sigmoid(fake_logits).mean()])
        batches_done = (epoch - 1) * len(dataloader) + i
        if save_interval and batches_done % save_interval == 0:
            save_samples_png(average or generator, fixed_z,
                             interval_dir / f"batch_{batches_done:06d}.png")
    totals = (totals / len(dataloader)).tolist()
    common.check_finite(torch.tensor(totals[:2]).sum(), f"epoch {epoch}")
    return dict(zip(("loss_d", "loss_g", "d_real", "d_fake"), totals, strict=True))


def get_lr(epoch, n_epochs, lr, decay_start):
    """Both networks' learning rate in ``epoch`` (counted from 1): ``lr`` until the fraction
    ``decay_start`` of training, then decaying linearly to lr / (epochs left) in the last epoch."""
    decay_epochs = max(1, n_epochs - int(decay_start * n_epochs))
    return lr * min(1.0, (n_epochs - epoch + 1) / decay_epochs)


# ---------------------------------------------------------------- sampling, interpolation, plots

@torch.no_grad()
def recompute_batchnorm(generator, n_batches=200, batch_size=64, seed=0):
    """Precise BatchNorm (Wu & Johnson, 2021): the running statistics, reset and then averaged with
    equal weight over ``n_batches`` batches of fresh z. Otherwise sampling would use the statistics
    G measured under its own weights, not the average's, and with momentum 0.1 mostly over its last
    ten batches."""
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


def sample_images(generator, n, seed=0):
    """``n`` images [n, 784] in [0, 1] from latent vectors drawn with ``seed``, 1,000 at a time."""
    device = next(generator.parameters()).device
    z = torch.randn(n, generator.latent_dim, generator=torch.Generator().manual_seed(seed))
    return torch.cat([generate(generator, chunk.to(device)) for chunk in z.split(1000)])


def save_samples_png(generator, z, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(generate(generator, z).reshape(-1, 1, 28, 28), path, nrow=5, padding=2, pad_value=1.0)


def interpolate(z_start, z_end, steps=7):
    """``steps`` latent vectors evenly between the two ends, with both ends: [steps + 2, latent_dim]."""
    weights = torch.linspace(0, 1, steps + 2, device=z_start.device)[:, None]
    return (1 - weights) * z_start + weights * z_end


def find_digit_pairs(generator, classifier, pairs=INTERPOLATION_PAIRS, n_candidates=2000, seed=0):
    """For each digit pair (a, b), the latent vectors among ``n_candidates`` whose samples the
    classifier finds most surely an a and a b. Returns (z_a, z_b, a, b, p_a, p_b) per pair."""
    device = next(generator.parameters()).device
    z = torch.randn(n_candidates, generator.latent_dim,
                    generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.inference_mode():
        probs = torch.softmax(classifier(generate(generator, z).to(device)), dim=1)
    confidence, best = probs.max(0)
    return [(z[best[a]], z[best[b]], a, b, confidence[a].item(), confidence[b].item()) for a, b in pairs]


def save_interpolations(generator, classifier, out):
    """Question 2.7: one row of 9 images between two different digits, and a figure of several rows."""
    pairs = find_digit_pairs(generator, classifier)
    rows = [generate(generator, interpolate(z_a, z_b)) for z_a, z_b, *_ in pairs]
    labels = [f"{a}→{b}" for _, _, a, b, _, _ in pairs]
    common.save_image_grid(rows[0], out / "interpolation", nrow=9, width=4.5)
    common.save_image_grid(torch.cat(rows), out / "interpolations", nrow=9, row_labels=labels, width=4.5)
    return [{"digits": [a, b], "classifier_confidence": [p_a, p_b]} for _, _, a, b, p_a, p_b in pairs]


def save_loss_plot(curves, stem, r1_gamma=0.0):
    """Per-epoch losses and the discriminator's mean outputs, side by side; the D loss includes the
    R1 term when the run had one."""
    epochs = range(1, len(curves["loss_d"]) + 1)
    fig, (ax_loss, ax_d) = plt.subplots(1, 2, figsize=(5.5, 2.4), layout="constrained")
    r1_term = f" $+ \\frac{{{r1_gamma:g}}}{{2}} R_1$" if r1_gamma > 0 else ""
    ax_loss.plot(epochs, curves["loss_d"], label="D: $-\\log D(x) - \\log(1-D(G(z)))$" + r1_term)
    ax_loss.plot(epochs, curves["loss_g"], label="G: $-\\log D(G(z))$")
    ax_loss.set_ylabel("mean loss per batch")
    ax_d.plot(epochs, curves["d_real"], label="$D(x)$, real")
    ax_d.plot(epochs, curves["d_fake"], label="$D(G(z))$, generated")
    ax_d.axhline(0.5, color="gray", linestyle=":", linewidth=1)
    ax_d.set_ylabel("mean discriminator output")
    for ax in (ax_loss, ax_d):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22))  # below the axes, off the curves
    common.save_figure(fig, stem)


# ---------------------------------------------------------------- evaluation of the trained model

def evaluate_progress(generator, snapshots, classifier, run):
    """The sample measures of the generator kept at each progress epoch, against the selection
    reference (training images), never the test set: this curve is what settings are chosen by."""
    progress = []
    current = copy.deepcopy(generator.state_dict())
    for epoch, state in sorted(snapshots.items()):
        generator.load_state_dict(state)
        row = evaluation.evaluate_samples(sample_images(generator, 10_000), root=run.data_root,
                                          device=run.device, classifier=classifier, reference="selection")
        run.log(f"epoch {epoch}: FID {row['fid']:.2f} against the selection reference, "
                f"score {row['score']:.2f}")
        progress.append({"epoch": epoch, **row})
    generator.load_state_dict(current)
    return progress


def load_sampler(checkpoint_path, device="cpu"):
    """``sample(n, seed=0)`` -> [n, 784] images in [0, 1] from the generator the run samples from
    (the weight average, unless the run trained with --template)."""
    saved = common.load_checkpoint(checkpoint_path, device)
    generator = Generator(saved["args"]["latent_dim"]).to(device)
    generator.load_state_dict(saved["state"].get("generator_average") or saved["state"]["generator"])
    return lambda n, seed=0: sample_images(generator, n, seed)


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--n_epochs", type=common.positive_int, default=200,
                        help="number of epochs (default 200)")
    parser.add_argument("--batch_size", type=common.positive_int, default=None,
                        help="batch size (default 128; 64 with --template)")
    parser.add_argument("--lr", type=common.positive_float, default=None,
                        help="Adam learning rate of both networks (default 4e-4; 2e-4 with --template)")
    parser.add_argument("--latent_dim", type=common.positive_int, default=100,
                        help="dimension of z (default 100)")
    parser.add_argument("--save_interval", type=common.positive_int, default=500,
                        help="save a 5x5 sample grid every this many batches (default 500)")
    return common.add_run_args(parser, out="results/gan").parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run = common.Run(args)
    setting = {**(TEMPLATE if args.template else OURS),
               **{k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr)) if v is not None}}
    dataloader = mnist_gan(run.data_root, batch_size=setting["batch_size"])
    generator = Generator(args.latent_dim).to(run.device)
    discriminator = Discriminator().to(run.device)
    optimizer_G, optimizer_D = (torch.optim.Adam(net.parameters(), lr=setting["lr"], betas=(0.5, 0.999),
                                                 fused=True) for net in (generator, discriminator))
    average = copy.deepcopy(generator) if setting["ema_decay"] else None
    sampler = average or generator  # what samples come from
    networks = {"generator": generator, "discriminator": discriminator, "optimizer_G": optimizer_G,
                "optimizer_D": optimizer_D, **({"generator_average": average} if average else {})}
    fixed_z = torch.randn(25, args.latent_dim, device=run.device)
    extra = run.restore(**networks)
    fixed_z, snapshots = extra.get("fixed_z", fixed_z), extra.get("snapshots", {})
    if run.epoch == 0:
        common.save_image_grid(generate(sampler, fixed_z), run.out / "samples_start", nrow=5)

    halfway = args.n_epochs // 2
    for epoch in run.epochs(args.n_epochs):
        lr = get_lr(epoch, args.n_epochs, setting["lr"], setting["lr_decay_start"])
        for group in (*optimizer_G.param_groups, *optimizer_D.param_groups):
            group["lr"] = lr
        with run.timed(len(dataloader.dataset)), common.training_precision():
            stats = train(dataloader, discriminator, generator, optimizer_G, optimizer_D, epoch=epoch,
                          save_interval=args.save_interval, interval_dir=run.out / "intervals",
                          fixed_z=fixed_z, average=average, ema_decay=setting["ema_decay"],
                          r1_gamma=setting["r1_gamma"], r1_interval=setting["r1_interval"])
        run.record(**stats)
        if epoch in PROGRESS_EPOCHS or epoch in (halfway, args.n_epochs):
            if average is not None:
                recompute_batchnorm(average, batch_size=setting["batch_size"])
            snapshots[epoch] = copy.deepcopy(sampler.state_dict())
        if epoch == halfway:
            common.save_image_grid(generate(sampler, fixed_z), run.out / "samples_halfway", nrow=5)
        run.save({"fixed_z": fixed_z, "snapshots": snapshots}, **networks)

    common.save_image_grid(generate(sampler, fixed_z), run.out / "samples_end", nrow=5)
    save_loss_plot(run.curves, run.out / "losses", setting["r1_gamma"])
    classifier = load_classifier(run.device)
    final = evaluation.evaluate_samples(sample_images(sampler, 10_000), root=run.data_root,
                                        device=run.device, classifier=classifier, out=run.out)
    run.log(f"test: FID {final['fid']:.2f}, score {final['score']:.2f}, Parzen {final['parzen_ll']:.1f}")
    run.finish(nn.ModuleList([generator, discriminator]), setting=setting,
               weights={"generator_average" if average else "generator": sampler, "fixed_z": fixed_z},
               n_params_generator=sum(p.numel() for p in generator.parameters()),
               interpolation_digits=save_interpolations(sampler, classifier, run.out),
               progress=evaluate_progress(sampler, snapshots, classifier, run), evaluation=final)


if __name__ == "__main__":
    common.cli(main)
