"""Part 3: a RealNVP normalizing flow on MNIST (assignment questions 3.4-3.8).

    python a3_nf_template.py                      # 40 epochs into results/nf/
    python a3_nf_template.py --template           # the course template's training
    python a3_nf_template.py --set lr=1e-3        # any field of Settings

x (pixels 0..255) is dequantized with uniform noise, scaled to [0, 1), squashed away from 0 and 1
and mapped to the real line by a logit, then through 8 affine coupling layers with alternating
checkerboard masks (Dinh et al., 2017) to z ~ N(0, I). Change of variables (question 3.1):

    log p(x) = sum_i log N(z_i; 0, 1) + log |det dz/dx|,

where the log-determinant adds up the scaling, the logit and every coupling. Reported as bits per
dimension, -log2 p(x) / 784, the density of the dequantized image in [0, 256)^784. The three layers
(dequantization, logit, flow) share one interface, ``(z, ldj, reverse=False) -> (z, ldj)``; the
couplings' network (``net``) and the dequantization layer (``dequantization``) can be handed in.
Outputs in --out: the figures of FIGURES (PNG + PDF), a sample grid per epoch in ``epochs/``, and
``metrics.json`` with the test bits/dim and the sample measures of ``evaluation``.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

import evaluation
import harness
from datasets.mnist import mnist

LOG_2PI = math.log(2 * math.pi)
N_PIXELS = 28 * 28
EVALUATION_SAMPLES = 10_000  # samples scored by evaluation.evaluate_samples
NOISE_SAMPLES = 8  # S of the importance-weighted test bits/dim over the dequantization noise
FIGURES = {name: name for name in ("samples_start", "samples_halfway", "samples_end", "bpd", "memorisation")}


# ---------------------------------------------------------------- settings

@dataclass(frozen=True)
class Settings:
    epochs: int = 40  # passes over the 40,000 training images (the template's --epochs)
    batch_size: int = 128  # images per Adam step (the template's), chosen on validation bits/dim
    lr: float = 5e-4  # Adam's peak learning rate, chosen on validation bits/dim (the template's 1e-3)
    # linear warm-up from lr / steps to lr over this many epochs, so that the first Adam steps, whose
    # moment estimates rest on a few gradients, are small; 0: none
    warmup_epochs: float = 1
    # after the warm-up, decay to 0 along a half cosine ending at the last step (Loshchilov and Hutter,
    # 2017); False: constant
    cosine_decay: bool = True
    # gradients of a larger norm are scaled down to it (torch.nn.utils.clip_grad_norm_), against the rare
    # step that would throw the flow far off; None: no clipping
    clip: float | None = 100.0
    n_flows: int = 4  # pairs of couplings (checkerboard, complement): the template's Flow(n_flows=4)
    n_hidden: int = 1024  # hidden width of each coupling's MLP: the template's Coupling(n_hidden=1024)

    def __post_init__(self):
        harness.settings.positive(self, "epochs", "batch_size", "clip", "n_flows", "n_hidden")


DEFAULT = Settings()
TEMPLATE = Settings(lr=1e-3, warmup_epochs=0, cosine_decay=False, clip=None)
TEMPLATE_FLAGS = {"epochs": "epochs"}


# ---------------------------------------------------------------- prior and mask

def log_prior(x):
    """Elementwise log-density of the standard normal: -x^2/2 - log(2 pi)/2."""
    return -0.5 * x.pow(2) - 0.5 * LOG_2PI


def sample_prior(size, device=None, generator=None):
    """Draws of the standard normal prior with the given shape."""
    return torch.randn(size, device=device, generator=generator)


def get_mask():
    """A [1, 784] float checkerboard on the 28x28 grid: 1 where (i + j) is even."""
    i, j = torch.meshgrid(torch.arange(28), torch.arange(28), indexing="ij")
    return ((i + j) % 2 == 0).float().reshape(1, N_PIXELS)


# ---------------------------------------------------------------- model

class Coupling(nn.Module):
    """Affine coupling (Dinh et al., 2017): the pixels where mask = 1 pass through unchanged and
    condition a scale and translation of the others,

        z' = mask * z + (1 - mask) * (z * exp(s(mask * z)) + t(mask * z)),

    so the Jacobian is triangular and log|det| = sum over the unmasked pixels of s. The network
    ``net`` maps the masked z [B, c_in] to [B, 2 * c_in], log-scale then translation; without one
    it is the template's MLP. Keyword arguments of ``forward`` go to the network (a conditional
    network's context); the MLP takes none."""

    def __init__(self, c_in, mask, n_hidden=1024, net=None):
        super().__init__()
        self.n_hidden = n_hidden
        self.register_buffer("mask", mask)
        if net is None:
            net = nn.Sequential(
                nn.Linear(c_in, n_hidden), nn.ReLU(),
                nn.Linear(n_hidden, n_hidden), nn.ReLU(),
                nn.Linear(n_hidden, 2 * c_in),
            )
            # Zero last layer: s = t = 0, so every coupling starts as the identity and training
            # starts from a well-conditioned flow.
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)
        self.nn = net

    def scale_and_translation(self, z, **context):
        log_scale, translation = self.nn(z * self.mask, **context).chunk(2, dim=1)
        # tanh bounds the log-scale to (-1, 1) per layer, which keeps exp() and the inverse stable.
        inverse_mask = 1 - self.mask
        return torch.tanh(log_scale) * inverse_mask, translation * inverse_mask

    def forward(self, z, ldj, reverse=False, **context):
        log_scale, translation = self.scale_and_translation(z, **context)
        if not reverse:
            z = z * torch.exp(log_scale) + translation
            ldj = ldj + log_scale.sum(dim=1)
        else:
            z = (z - translation) * torch.exp(-log_scale)
            ldj = ldj - log_scale.sum(dim=1)
        return z, ldj


class Flow(nn.Module):
    """2 * n_flows couplings, alternating the checkerboard and its complement. Each coupling's
    network is the template's MLP, or ``net(mask)`` when that factory is given."""

    def __init__(self, shape, n_flows=4, n_hidden=1024, net=None):
        super().__init__()
        (channels,) = shape
        mask = get_mask()
        self.layers = nn.ModuleList()
        for _ in range(n_flows):
            for layer_mask in (mask, 1 - mask):
                network = None if net is None else net(layer_mask)
                self.layers.append(Coupling(c_in=channels, mask=layer_mask, n_hidden=n_hidden, net=network))
        self.z_shape = (channels,)

    def forward(self, z, logdet, reverse=False, **context):
        layers = reversed(self.layers) if reverse else self.layers
        for layer in layers:
            z, logdet = layer(z, logdet, reverse=reverse, **context)
        return z, logdet


class UniformDequantization(nn.Module):
    """x + u, u ~ U[0, 1)^784 (question 3.4): a continuous density on [0, 256) whose likelihood
    lower-bounds the discrete model's, instead of point masses with unbounded density. q(u | x) = 1,
    so the log-determinant is unchanged. Reverse: floor, back to the pixel values 0..255."""

    def forward(self, z, ldj, reverse=False, generator=None):
        if reverse:
            return z.floor().clamp(0, 255), ldj
        return z + torch.rand(z.shape, device=z.device, generator=generator), ldj


class Model(nn.Module):
    """Dequantization, logit normalisation and the flow: ``forward`` gives log p(x) per image,
    ``sample`` draws images. ``dequantization`` builds the first layer: any module with the
    couplings' interface whose forward subtracts log q(u | x) from the log-determinant. ``flow``,
    if given, replaces the template's Flow: any module of that interface on [B, 784] with a
    ``z_shape``."""

    ALPHA = 1e-5  # keeps the logit's argument in [alpha/2, 1 - alpha/2]: no log(0), no infinite z

    def __init__(self, shape, n_flows=4, n_hidden=1024, net=None, dequantization=UniformDequantization,
                 flow=None):
        super().__init__()
        self.flow = Flow(shape, n_flows, n_hidden, net) if flow is None else flow
        self.dequantizer = dequantization()

    def dequantize(self, z, ldj, reverse=False, generator=None):
        """The first layer, ``dequantization``'s module, forward or in reverse."""
        return self.dequantizer(z, ldj, reverse, generator=generator)

    def logit_normalize(self, z, logdet, reverse=False):
        """y = logit(alpha/2 + (1 - alpha) x / 256) and its inverse, with the log-determinant of
        each step: -log 256 and log(1 - alpha) per pixel, and log |d logit(p)/dp| = -log p(1 - p)."""
        scale = N_PIXELS * (math.log(1 - self.ALPHA) - math.log(256.0))
        if not reverse:
            p = self.ALPHA / 2 + (1 - self.ALPHA) * z / 256.0
            log_p, log_1mp = torch.log(p), torch.log1p(-p)
            return log_p - log_1mp, logdet + scale - (log_p + log_1mp).sum(dim=1)
        log_p, log_1mp = nn.functional.logsigmoid(z), nn.functional.logsigmoid(-z)
        x = (torch.exp(log_p) - self.ALPHA / 2) / (1 - self.ALPHA) * 256.0
        return x, logdet - scale + (log_p + log_1mp).sum(dim=1)

    def forward(self, input, generator=None):
        """log p(x + u) - log q(u | x) per image, input [B, 784] with values 0..255 and u drawn by
        the dequantization layer (``generator`` fixes its noise); its expectation lower-bounds the
        discrete log P(input)."""
        ldj = input.new_zeros(input.size(0))
        z, ldj = self.dequantize(input, ldj, generator=generator)
        z, ldj = self.logit_normalize(z, ldj)
        z, ldj = self.flow(z, ldj)
        return log_prior(z).sum(dim=1) + ldj

    @torch.no_grad()
    def sample(self, n_samples, generator=None):
        """Images [n, 784] of pixel values 0..255: z ~ N(0, I) through the three layers in reverse."""
        device = next(self.parameters()).device
        z = sample_prior((n_samples,) + self.flow.z_shape, device=device, generator=generator)
        ldj = torch.zeros(n_samples, device=device)
        z, ldj = self.flow(z, ldj, reverse=True)
        z, ldj = self.logit_normalize(z, ldj, reverse=True)
        z, _ = self.dequantize(z, ldj, reverse=True)
        return z


def build_model(settings):
    """The template's model with the sizes of ``settings``."""
    return Model([N_PIXELS], n_flows=settings.n_flows, n_hidden=settings.n_hidden)


# ---------------------------------------------------------------- loss

def bits_per_dim(log_px):
    """-log2 p(x) / 784: nats to bits, per pixel. Includes the /256 and logit Jacobians, so it
    measures the density of the dequantized image on [0, 256)^784, the standard convention."""
    return -log_px / (N_PIXELS * math.log(2))


@torch.no_grad()
def importance_weighted_bpd(model, data, samples):
    """Bits/dim of the importance-weighted estimate over the dequantization noise, averaged over
    ``data``: -log2 (1/S) sum_s p(x + u_s) / q(u_s | x) / 784 with S = ``samples`` draws u_s ~ q
    (uniform: q = 1). A tighter bound on the discrete log P(x) than the one-sample bound, which it is
    at S = 1 (Burda et al., 2016; Ho et al., 2019, sec. 3.1). Fixed noise, as in evaluation passes."""
    device = next(model.parameters()).device
    noise = torch.Generator(device=device).manual_seed(0)
    total, count = torch.zeros((), device=device), 0
    for imgs, _ in tqdm(data, leave=False, disable=None):
        imgs = imgs.to(device, non_blocking=True)
        log_weights = torch.stack([model(imgs, generator=noise) for _ in range(samples)])
        log_px = torch.logsumexp(log_weights, dim=0) - math.log(samples)
        total += bits_per_dim(log_px).sum()
        count += len(imgs)
    return (total / count).item()


# ---------------------------------------------------------------- epoch loop

def get_lr(step, steps_per_epoch, settings):
    """The learning rate of training step ``step`` (counted from 0): a linear warm-up over
    ``settings.warmup_epochs``, then a half-cosine decay to 0 at the last of ``settings.epochs``
    epochs (or constant)."""
    warmup = settings.warmup_epochs * steps_per_epoch
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    if not settings.cosine_decay:
        return settings.lr
    total_steps = settings.epochs * steps_per_epoch
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return settings.lr * 0.5 * (1 + math.cos(math.pi * progress))


def epoch_iter(model, data, optimizer, settings=None, first_step=0):
    """Average bits/dim over ``data``. Trains when ``model.training``: step ``first_step + i`` runs at
    ``get_lr`` of ``settings`` and clips the gradient norm to ``settings.clip`` (without settings, as
    the template: the optimizer's own learning rate, no clipping). Otherwise it evaluates without
    gradients and with fixed dequantization noise, so validation numbers are deterministic."""
    device = next(model.parameters()).device
    total, count = torch.zeros((), device=device), 0
    noise = None if model.training else torch.Generator(device=device).manual_seed(0)
    for i, (imgs, _) in enumerate(tqdm(data, leave=False, disable=None)):
        imgs = imgs.to(device, non_blocking=True)
        with torch.set_grad_enabled(model.training):
            bpd = bits_per_dim(model(imgs, generator=noise))
            loss = bpd.mean()
        if model.training:
            harness.check_finite(loss, f"training step {first_step + i}")
            if settings is not None:
                for group in optimizer.param_groups:
                    group["lr"] = get_lr(first_step + i, len(data), settings)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings is not None and settings.clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), settings.clip)
            optimizer.step()
        total += bpd.detach().sum()
        count += len(imgs)
    return (total / count).item()


def run_epoch(model, data, optimizer, settings=None, first_step=0, precision="fp32"):
    """(train bpd, val bpd): one training pass, its matmuls in ``precision``, and one fp32 validation pass."""
    traindata, valdata = data
    model.train()
    with harness.matmul_precision(precision):
        train_bpd = epoch_iter(model, traindata, optimizer, settings, first_step)
    model.eval()
    val_bpd = epoch_iter(model, valdata, optimizer)
    return train_bpd, val_bpd


def train(model, traindata, valdata, settings, run):
    """Adam (fused: the same steps in fewer kernels) for ``settings.epochs`` epochs, resumed where
    ``run`` left off; a checkpoint and a sample grid every epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, fused=True)
    run.restore(model=model, optimizer=optimizer)
    if run.is_new:
        save_samples(model, run.out / "samples_start")
    for epoch in run.epochs(settings.epochs):
        with run.timed(len(traindata.dataset)):
            train_bpd, val_bpd = run_epoch(model, (traindata, valdata), optimizer, settings,
                                           first_step=(epoch - 1) * len(traindata), precision=run.precision)
        run.record(train_bpd=train_bpd, val_bpd=val_bpd)
        save_samples(model, run.out / "epochs" / f"epoch_{epoch:02d}")
        if epoch == settings.epochs // 2:
            save_samples(model, run.out / "samples_halfway")
        run.save(model=model, optimizer=optimizer)


# ---------------------------------------------------------------- figures

def bpd_axis(train_curve, val_curve):
    """The bits/dim range of save_bpd_plot, the one that matters: the first epochs' values far above
    the assignment's bar of 1.85 are cut off at 2 bits/dim, unless the whole run stays above."""
    values = [*train_curve, *val_curve]
    low, high = min(values), max(values)
    top = high if low > 1.9 else min(high, 2.0)
    return low - 0.02, top + 0.02


def save_bpd_plot(train_curve, val_curve, filename):
    """Bits/dim per epoch against the assignment's bar of 1.85, on ``bpd_axis``."""
    harness.save_curves({"train": train_curve, "validation": val_curve}, filename,
                        ylabel="bits per dimension", start=1, references={"assignment's bar": 1.85},
                        ylim=bpd_axis(train_curve, val_curve))


def sample_images(model, n, seed=0):
    """``n`` samples as pixel images [n, 784] in [0, 1] on the CPU, drawn 1,000 at a time with a
    seeded generator."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    chunks = [model.sample(min(1000, n - i), generator) for i in range(0, n, 1000)]
    return (torch.cat(chunks) / 255).cpu()


def save_samples(model, stem, n=64, seed=0):
    harness.save_image_grid(sample_images(model, n, seed), stem, nrow=8)


def load_sampler(checkpoint_path, device="cpu", settings_class=Settings, build=build_model):
    """``sample(n, seed=0)`` -> [n, 784] images in [0, 1] (floored to pixels) of a checkpoint whose
    settings are a ``settings_class``, its model made by ``build``."""
    saved = harness.load_checkpoint(checkpoint_path, device)
    model = build(settings_class(**saved["settings"])).to(device)
    model.load_state_dict(saved["state"]["model"])
    model.eval()
    return lambda n, seed=0: sample_images(model, n, seed)


# ---------------------------------------------------------------- evaluation

def evaluate(model, test_data, run):
    """The test bits/dim, of the one-sample bound and importance-weighted over the noise, and the
    sample measures of ``evaluation``. Rebuilt from weights (``--from_weights``), the test bits/dim,
    minutes of CPU, keep the run's values; the samples are seeded, so they come out the same."""
    model.eval()
    results = {}
    if not run.from_weights:
        test = {"bpd": epoch_iter(model, test_data, None), "noise_samples": NOISE_SAMPLES,
                "bpd_importance_weighted": importance_weighted_bpd(model, test_data, NOISE_SAMPLES)}
        run.log(f"test: {test['bpd']:.4f} bits/dim, {test['bpd_importance_weighted']:.4f} importance-"
                f"weighted over {NOISE_SAMPLES} noise draws")
        results["test"] = test
    images = sample_images(model, EVALUATION_SAMPLES)
    results["evaluation"] = evaluation.evaluate_samples(images, root=run.data_root, device=run.device,
                                                        out=run.out)
    return results


# ---------------------------------------------------------------- main

def parse_args(argv=None, doc=__doc__, out="results/nf"):
    return harness.parse_args(argv, doc, out, DEFAULT, TEMPLATE_FLAGS)


def main(argv=None, defaults=(DEFAULT, TEMPLATE), build=build_model, doc=__doc__, out="results/nf"):
    """Train (or rebuild from weights), draw the figures, evaluate, write metrics.json. An extension
    passes its own settings ``defaults`` (DEFAULT, TEMPLATE), model ``build``er, ``doc`` and ``out``."""
    args = parse_args(argv, doc, out)
    settings = harness.settings.resolve(args, *defaults)
    run = harness.Run(args, settings)
    traindata, valdata, testdata = mnist(run.data_root, batch_size=settings.batch_size)
    model = build(settings).to(run.device)
    if args.from_weights:
        run.load_weights(model=model)
    else:
        train(model, traindata, valdata, settings, run)
    save_samples(model, run.out / "samples_end")
    save_bpd_plot(run.curves["train_bpd"], run.curves["val_bpd"], run.out / "bpd")
    results = evaluate(model, testdata, run)
    run.finish(model, results, weights={"model": model}, milestones={"halfway": settings.epochs // 2},
               figures=FIGURES)


if __name__ == "__main__":
    harness.cli(main)
