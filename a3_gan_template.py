"""Part 2: a generative adversarial network on MNIST (assignment questions 2.4-2.7).

    python a3_gan_template.py                   # DEFAULT settings, 200 epochs into results/gan/
    python a3_gan_template.py --template        # the course template's training (TEMPLATE)
    python a3_gan_template.py --set r1_gamma=0  # any field of Settings

The template's MLPs (Goodfellow et al., 2014) on all 60,000 training images scaled to [-1, 1], D
trained by binary cross-entropy, G by the non-saturating loss, both with Adam; what DEFAULT adds is
in the comments of ``Settings``. Outputs in --out: the figures of FIGURES (PNG + PDF), a 5x5 grid
every save_interval batches in ``intervals/``, and ``metrics.json`` with the sample measures of
``evaluation`` during training (against training images) and at the end (against the test set).
"""

import copy
from dataclasses import dataclass

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn
from tqdm import tqdm

import evaluation
import harness
from datasets.mnist import mnist_gan
from evaluation.classifier import load_classifier

N_PIXELS = 28 * 28
EVALUATION_SAMPLES = 10_000  # samples scored by evaluation.evaluate_samples
BN_BATCHES = 200  # batches of z over which the weight average's BatchNorm statistics are measured
PROGRESS_EPOCHS = (1, 5, 10, 25, 50, 100, 150)  # plus halfway and the last: the measures' curve
INTERPOLATION_PAIRS = ((1, 7), (3, 8), (0, 6), (4, 9), (2, 5), (5, 3))
FIGURES = {name: name for name in ("samples_start", "samples_halfway", "samples_end", "losses",
                                   "interpolation", "interpolations", "memorisation")}


@dataclass(frozen=True)
class Settings:
    epochs: int = 200  # passes over the training images (the template's --n_epochs)
    latent_dim: int = 100  # dimension of z ~ N(0, I) (the template's --latent_dim)
    batch_size: int = 64  # images per step of D and of G (the template's)
    lr: float = 2e-4  # Adam's learning rate of both networks (the template's)
    adam_beta1: float = 0.5  # Adam's first-moment decay, lowered from 0.9 as in DCGAN (Radford et al., 2016)
    adam_beta2: float = 0.999  # Adam's second-moment decay, its default
    # R1 penalty (gamma / 2) E ||grad_x D_logit(x)||^2 on real images (Mescheder et al., 2018); 0: none
    r1_gamma: float = 0.3
    # lazy regularisation (Karras et al., 2020): the penalty, weighted k times, on every k-th batch only
    r1_interval: int = 8
    # samples from an exponential moving average of G's weights (Yazici et al., 2019) with this decay,
    # its BatchNorm statistics measured afresh (precise BN, Wu & Johnson, 2021); None: from G itself
    ema_decay: float | None = 0.999
    # the fraction of training after which both learning rates decay linearly towards 0; 1.0: constant
    lr_decay_start: float = 0.5
    save_interval: int = 500  # a 5x5 grid of samples every this many batches (the template's)

    def __post_init__(self):
        harness.settings.positive(self, "epochs", "latent_dim", "batch_size", "r1_interval",
                                  "save_interval")


DEFAULT = Settings()
TEMPLATE = Settings(r1_gamma=0.0, r1_interval=1, ema_decay=None, lr_decay_start=1.0)
# The template's flags, each a name for --set FIELD=VALUE.
TEMPLATE_FLAGS = {"n_epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "latent_dim": "latent_dim",
                  "save_interval": "save_interval"}


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
            nn.Linear(1024, N_PIXELS), nn.Tanh(),
        )

    def forward(self, z):
        return self.net(z)


class Discriminator(nn.Module):
    """image [B, 784] or [B, 1, 28, 28]  ->  D(x), the probability that x is real."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(N_PIXELS, 512), nn.LeakyReLU(0.2),
            nn.Linear(512, 256), nn.LeakyReLU(0.2),
            nn.Linear(256, 1),
        )

    def logits(self, img):
        """The logit l of D(x) = sigmoid(l): what the losses use, so that log D is a log-sigmoid."""
        return self.net(img.reshape(len(img), N_PIXELS)).squeeze(1)

    def forward(self, img):
        return torch.sigmoid(self.logits(img))


# ---------------------------------------------------------------- losses

def discriminator_loss(real_logits, fake_logits):
    """-[log D(x) + log(1 - D(G(z)))], the binary cross-entropy of real against generated images
    (question 2.2). With D = sigmoid(l): -log D = softplus(-l) and -log(1 - D) = softplus(l)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits):
    """The non-saturating loss -log D(G(z)) (question 2.4): strong gradients when D rejects the fakes
    early on, where the minimax loss log(1 - D(G(z))) saturates."""
    return F.softplus(-fake_logits).mean()


def r1_penalty(real, real_logits):
    """R1 = E_x ||grad_x D_logit(x)||^2 on real images (Mescheder et al., 2018): it flattens
    D's surface around the data, so D cannot keep sharpening against G. ``real`` must have required
    grad before ``real_logits`` were computed."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.square().sum(1).mean()


# ---------------------------------------------------------------- training

def get_lr(step, steps_per_epoch, settings):
    """Both networks' learning rate at global ``step`` (from 0): settings.lr until the fraction
    lr_decay_start of the epochs, then decaying linearly, epoch by epoch, to lr / (epochs decayed)."""
    epoch = step // steps_per_epoch + 1
    decay_epochs = max(1, settings.epochs - int(settings.lr_decay_start * settings.epochs))
    return settings.lr * min(1.0, (settings.epochs - epoch + 1) / decay_epochs)


def weight_average(generator, decay):
    """The moving average of G's weights, average <- decay * average + (1 - decay) * G after every G
    step (Yazici et al., 2019), starting at G's weights; BatchNorm buffers are copied from G
    (use_buffers=False), as they are running averages already."""
    average = AveragedModel(generator, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    average.update_parameters(generator)  # the first update copies: the next one already averages
    return average


def train(dataloader, discriminator, generator, optimizer_G, optimizer_D, *, settings, epoch=1,
          average=None, fixed_z=None, interval_dir=None, precision="fp32"):
    """One epoch (counted from 1); returns the batch means of both losses (D's with R1), D(x) and
    D(G(z)). ``average`` follows G; a grid of it (or G) at ``fixed_z`` goes to ``interval_dir``."""
    device = next(generator.parameters()).device
    generator.train()
    discriminator.train()
    totals = torch.zeros(4, device=device)
    with harness.matmul_precision(precision):
        for i, (imgs, _) in enumerate(tqdm(dataloader, desc=f"epoch {epoch}", leave=False, disable=None)):
            batches_done = (epoch - 1) * len(dataloader) + i
            for group in (*optimizer_G.param_groups, *optimizer_D.param_groups):
                group["lr"] = get_lr(batches_done, len(dataloader), settings)
            real = imgs.to(device, non_blocking=True).reshape(len(imgs), N_PIXELS)
            z = torch.randn(len(real), generator.latent_dim, device=device)
            gen_imgs = generator(z)

            # ----------------------------------------------------------------------------------
            #  Train Generator: minimise -log D(G(z)), D frozen (its gradients would be discarded)
            # ----------------------------------------------------------------------------------
            discriminator.requires_grad_(False)
            fake_logits = discriminator.logits(gen_imgs)
            loss_g = generator_loss(fake_logits)
            optimizer_G.zero_grad(set_to_none=True)
            loss_g.backward()
            optimizer_G.step()
            discriminator.requires_grad_(True)
            if average is not None:
                average.update_parameters(generator)

            # ----------------------------------------------------------------------------------
            #  Train Discriminator: minimise -log D(x) - log(1 - D(G(z))) + (gamma / 2) R1 on the
            #  same fakes, detached; one pass over both (D has no BatchNorm); lazy R1 every k-th batch
            # ----------------------------------------------------------------------------------
            regularize = settings.r1_gamma > 0 and i % settings.r1_interval == 0
            real.requires_grad_(regularize)
            real_logits, fake_logits = discriminator.logits(torch.cat([real, gen_imgs.detach()])).chunk(2)
            loss_d = discriminator_loss(real_logits, fake_logits)
            if regularize:
                loss_d = loss_d + settings.r1_gamma * settings.r1_interval / 2 * r1_penalty(real, real_logits)
            optimizer_D.zero_grad(set_to_none=True)
            loss_d.backward()
            optimizer_D.step()

            with torch.no_grad():
                totals += torch.stack([loss_d, loss_g, torch.sigmoid(real_logits).mean(),
                                       torch.sigmoid(fake_logits).mean()])
            # ---- Save Images (every save_interval batches, counted over the run)
            if interval_dir is not None and batches_done % settings.save_interval == 0:
                harness.save_image_grid(generate(average.module if average else generator, fixed_z),
                                        interval_dir / f"batch_{batches_done:06d}", nrow=5)
    means = (totals / len(dataloader)).tolist()
    harness.check_finite(torch.tensor(means[:2]).sum(), f"epoch {epoch}")
    return dict(zip(("loss_d", "loss_g", "d_real", "d_fake"), means, strict=True))


def refresh_batchnorm(average, batch_size):
    """Precise BatchNorm (Wu & Johnson, 2021): the average's running statistics reset, then averaged
    with equal weight over BN_BATCHES seeded batches of z. Otherwise sampling would use the statistics
    G measured under its own weights, and with momentum 0.1 mostly over its last ten batches."""
    seeded = torch.Generator().manual_seed(0)
    z = torch.randn(BN_BATCHES, batch_size, average.module.latent_dim, generator=seeded)
    update_bn(z, average, device=next(average.parameters()).device)


def train_epochs(run, settings, dataloader, generator, discriminator, average):
    """The epoch loop, resumable: ``train`` once per epoch; the sampler's weights are kept at the
    progress epochs for ``evaluate_progress``. Returns {"fixed_z", "snapshots"}."""
    optimizer_G, optimizer_D = (torch.optim.Adam(net.parameters(), lr=settings.lr, fused=True,
                                                 betas=(settings.adam_beta1, settings.adam_beta2))
                                for net in (generator, discriminator))
    sampler = average.module if average else generator
    stateful = {"generator": generator, "discriminator": discriminator, "optimizer_G": optimizer_G,
                "optimizer_D": optimizer_D, **({"generator_average": sampler} if average else {})}
    extra = {"fixed_z": torch.randn(25, settings.latent_dim, device=run.device), "snapshots": {}}
    extra |= run.restore(**stateful)
    if run.is_new:
        harness.save_image_grid(generate(sampler, extra["fixed_z"]), run.out / "samples_start", nrow=5)
    halfway = settings.epochs // 2
    for epoch in run.epochs(settings.epochs):
        with run.timed(len(dataloader.dataset)):
            stats = train(dataloader, discriminator, generator, optimizer_G, optimizer_D, settings=settings,
                          epoch=epoch, average=average, fixed_z=extra["fixed_z"],
                          interval_dir=run.out / "intervals", precision=run.precision)
        run.record(**stats)
        if epoch in PROGRESS_EPOCHS or epoch in (halfway, settings.epochs):
            if average is not None:
                refresh_batchnorm(average, settings.batch_size)
            extra["snapshots"][epoch] = copy.deepcopy(sampler.state_dict())
        if epoch == halfway:
            harness.save_image_grid(generate(sampler, extra["fixed_z"]), run.out / "samples_halfway", nrow=5)
        run.save(extra, **stateful)
    return extra


# ---------------------------------------------------------------- sampling, interpolation, plots

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


def interpolate(z_start, z_end, steps=7):
    """``steps`` latent vectors evenly between the two ends, with both ends: [steps + 2, latent_dim]."""
    weights = torch.linspace(0, 1, steps + 2, device=z_start.device)[:, None]
    return (1 - weights) * z_start + weights * z_end


def find_digit_pairs(generator, classifier, pairs=INTERPOLATION_PAIRS, n_candidates=2000, seed=0):
    """For each digit pair (a, b), the latent vectors among ``n_candidates`` whose samples the
    classifier finds most surely an a and a b. Returns (z_a, z_b, a, b, p_a, p_b) per pair."""
    device = next(generator.parameters()).device
    seeded = torch.Generator().manual_seed(seed)
    z = torch.randn(n_candidates, generator.latent_dim, generator=seeded).to(device)
    with torch.inference_mode():
        probs = torch.softmax(classifier(generate(generator, z).to(device)), dim=1)
    confidence, best = probs.max(0)
    return [(z[best[a]], z[best[b]], a, b, confidence[a].item(), confidence[b].item()) for a, b in pairs]


def save_interpolations(generator, classifier, out):
    """Question 2.7: one row of 9 images between two different digits, and a figure of several rows."""
    pairs = find_digit_pairs(generator, classifier)
    rows = [generate(generator, interpolate(z_a, z_b)) for z_a, z_b, *_ in pairs]
    labels = [f"{a}→{b}" for _, _, a, b, _, _ in pairs]
    harness.save_image_grid(rows[0], out / "interpolation", nrow=9, width=4.5)
    harness.save_image_grid(torch.cat(rows), out / "interpolations", nrow=9, row_labels=labels, width=4.5)
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
    harness.save_figure(fig, stem)


# ---------------------------------------------------------------- evaluation

def evaluate_progress(generator, snapshots, classifier, run):
    """The sample measures of the sampler kept at each progress epoch, against the selection
    reference (training images), never the test set: this curve is what settings are chosen by."""
    progress = []
    current = copy.deepcopy(generator.state_dict())
    for epoch, state in sorted(snapshots.items()):
        generator.load_state_dict(state)
        row = evaluation.evaluate_samples(sample_images(generator, EVALUATION_SAMPLES), root=run.data_root,
                                          device=run.device, classifier=classifier, reference="selection")
        run.log(f"epoch {epoch}: FID {row['fid']:.2f}, score {row['score']:.2f} (selection reference)")
        progress.append({"epoch": epoch, **row})
    generator.load_state_dict(current)
    return progress


def milestones(settings):
    """halfway (the samples_halfway epoch) and lr_decay_start, the first epoch of a lower learning
    rate, if any (get_lr at one step per epoch: step e - 1 is epoch e)."""
    decayed = [e for e in range(1, settings.epochs + 1) if get_lr(e - 1, 1, settings) < settings.lr]
    return {"halfway": settings.epochs // 2, **({"lr_decay_start": decayed[0]} if decayed else {})}


def load_sampler(checkpoint_path, device="cpu"):
    """``sample(n, seed=0)`` -> [n, 784] images in [0, 1] from the generator the run samples from
    (the weight average, unless the run had ema_decay None)."""
    saved = harness.load_checkpoint(checkpoint_path, device)
    generator = Generator(Settings(**saved["settings"]).latent_dim).to(device)
    generator.load_state_dict(saved["state"].get("generator_average") or saved["state"]["generator"])
    return lambda n, seed=0: sample_images(generator, n, seed)


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    return harness.parse_args(argv, __doc__, "results/gan", DEFAULT, TEMPLATE_FLAGS)


def main(argv=None):
    args = parse_args(argv)
    settings = harness.settings.resolve(args, DEFAULT, TEMPLATE)
    run = harness.Run(args, settings)
    dataloader = mnist_gan(run.data_root, batch_size=settings.batch_size)
    generator, discriminator = Generator(settings.latent_dim).to(run.device), Discriminator().to(run.device)
    average = None if settings.ema_decay is None else weight_average(generator, settings.ema_decay)
    sampler = average.module if average else generator  # what samples come from
    sampling = {"generator_average" if average else "generator": sampler}

    if args.from_weights:
        extra = run.load_weights(**sampling)  # fixed_z; the progress snapshots live in the checkpoint only
    else:
        extra = train_epochs(run, settings, dataloader, generator, discriminator, average)

    harness.save_image_grid(generate(sampler, extra["fixed_z"]), run.out / "samples_end", nrow=5)
    save_loss_plot(run.curves, run.out / "losses", settings.r1_gamma)
    classifier = load_classifier(run.device)
    digits = save_interpolations(sampler, classifier, run.out)
    progress = evaluate_progress(sampler, extra.get("snapshots", {}), classifier, run)
    final = evaluation.evaluate_samples(sample_images(sampler, EVALUATION_SAMPLES), root=run.data_root,
                                        device=run.device, classifier=classifier, out=run.out)
    run.log(f"test: FID {final['fid']:.2f}, score {final['score']:.2f}, Parzen {final['parzen_ll']:.1f}")
    results = {"n_params_generator": sum(p.numel() for p in generator.parameters()),
               "interpolation_digits": digits, "progress": progress, "evaluation": final}
    weights = {**sampling, "fixed_z": extra["fixed_z"]}
    marks = milestones(settings)
    run.finish(nn.ModuleList([generator, discriminator]), results, weights=weights, milestones=marks,
               figures=FIGURES)


if __name__ == "__main__":
    harness.cli(main)
