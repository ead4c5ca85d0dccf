"""Part 3: a RealNVP normalizing flow on MNIST (assignment questions 3.4-3.8).

    python a3_nf_template.py                 # 40 epochs into results/nf/
    python a3_nf_template.py --template      # the course template's training

x (pixels 0..255) is dequantized with uniform noise, scaled to [0, 1), squashed away from 0 and 1
and mapped to the real line by a logit, then through 8 affine coupling layers with alternating
checkerboard masks (Dinh et al., 2017) to z ~ N(0, I). Change of variables (question 3.1):

    log p(x) = sum_i log N(z_i; 0, 1) + log |det dz/dx|,

where the log-determinant adds up the scaling, the logit and every coupling. Reported as bits per
dimension, -log2 p(x) / 784, the density of the dequantized image in [0, 256)^784.

The template's flow and Adam, for 40 epochs on 40,000 training images; beyond the template, batches
of 256 instead of 128, a learning rate of 5e-4 (instead of 1e-3) warmed up linearly over the first
epoch and then decayed to 0 along a half cosine, and gradients clipped to norm 100. ``--template``
trains at batch 128 with a constant 1e-3 and no clipping. Outputs in --out (PNG + PDF): ``bpd``
(train and validation bits/dim per epoch), ``samples_{start,halfway,end}``, a grid per epoch in
``epochs/``, and ``metrics.json`` with the test bits/dim and the sample measures of ``evaluation``.
"""

import math

import torch
import torch.nn as nn
from torchvision.utils import save_image
from tqdm import tqdm

import common
import evaluation
from datasets.mnist import mnist

LOG_2PI = math.log(2 * math.pi)
N_PIXELS = 784
# Our training, and the course template's, which --template restores.
OURS = {"batch_size": 256, "lr": 5e-4, "warmup_epochs": 1, "cosine_decay": True, "clip": 100.0}
TEMPLATE = {"batch_size": 128, "lr": 1e-3, "warmup_epochs": 0, "cosine_decay": False, "clip": None}
# Convolutional couplings train on smaller batches at the template's learning rate, warmed up over a
# quarter of an epoch: a hundred times fewer parameters than the MLP's, and more steps per image.
CONV_TRAINING = {"batch_size": 128, "lr": 1e-3, "warmup_epochs": 0.25}
EVALUATION_SAMPLES = 10_000
NOISE_SAMPLES = 8  # S of the importance-weighted bits/dim over the dequantization noise


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

class ConvNet(nn.Module):
    """The coupling network of ``--coupling conv``, in place of the template's MLP: RealNVP's own
    choice of convolutional coupling networks (Dinh et al., 2017). Its input is the masked image with
    the mask as an extra channel (and, in the dequantizer, the image it conditions on). A squeeze
    (``pixel_unshuffle``) first moves each 2x2 block of the 28x28 grid into 4 channels, so every
    convolution runs on 14x14, at a quarter of the cost, and sees twice as far; then residual blocks
    h + conv(elu(h)), and an output convolution initialised to zero, unsqueezed back to 28x28."""

    def __init__(self, in_channels=2, out_channels=2, channels=32, blocks=2):
        super().__init__()
        self.input = nn.Conv2d(4 * in_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(blocks))
        self.output = nn.Conv2d(channels, 4 * out_channels, 3, padding=1)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x):
        """[B, in_channels, 28, 28] -> [B, out_channels * 784], channel by channel."""
        h = self.input(nn.functional.pixel_unshuffle(x, 2))
        for conv in self.blocks:
            h = h + conv(nn.functional.elu(h))
        out = nn.functional.pixel_shuffle(self.output(nn.functional.elu(h)), 2)
        return out.flatten(1)


class Coupling(nn.Module):
    """Affine coupling (Dinh et al., 2017): the pixels where mask = 1 pass through unchanged and
    condition a scale and translation of the others,

        z' = mask * z + (1 - mask) * (z * exp(s(mask * z)) + t(mask * z)),

    so the Jacobian is triangular and log|det| = sum over the unmasked pixels of s. s and t come from
    the template's MLP, or from ``conv_net`` (a ``ConvNet``) when one is given, which can also see a
    ``context`` image [B, C, 28, 28] that the coupling is conditioned on.
    """

    def __init__(self, c_in, mask, n_hidden=1024, conv_net=None):
        super().__init__()
        self.n_hidden = n_hidden
        self.register_buffer("mask", mask)
        if conv_net is None:
            self.nn = nn.Sequential(
                nn.Linear(c_in, n_hidden), nn.ReLU(),
                nn.Linear(n_hidden, n_hidden), nn.ReLU(),
                nn.Linear(n_hidden, 2 * c_in),
            )
            # Zero last layer: s = t = 0, so every coupling starts as the identity and training
            # starts from a well-conditioned flow.
            nn.init.zeros_(self.nn[-1].weight)
            nn.init.zeros_(self.nn[-1].bias)
        else:
            self.nn = conv_net  # its zero output convolution makes it the identity too

    def scale_and_translation(self, z, context=None):
        if isinstance(self.nn, ConvNet):
            mask = self.mask.view(1, 1, 28, 28).expand(len(z), -1, -1, -1)
            images = [(z * self.mask).view(-1, 1, 28, 28), mask]
            if context is not None:
                images.append(context)
            out = self.nn(torch.cat(images, dim=1))
        else:
            out = self.nn(z * self.mask)
        log_scale, translation = out.chunk(2, dim=1)
        # tanh bounds the log-scale to (-1, 1) per layer, which keeps exp() and the inverse stable.
        inverse_mask = 1 - self.mask
        return torch.tanh(log_scale) * inverse_mask, translation * inverse_mask

    def forward(self, z, ldj, reverse=False, context=None):
        log_scale, translation = self.scale_and_translation(z, context)
        if not reverse:
            z = z * torch.exp(log_scale) + translation
            ldj = ldj + log_scale.sum(dim=1)
        else:
            z = (z - translation) * torch.exp(-log_scale)
            ldj = ldj - log_scale.sum(dim=1)
        return z, ldj


class Flow(nn.Module):
    """2 * n_flows couplings, alternating the checkerboard and its complement; each coupling's
    network is the template's MLP, or a new ``conv_net()`` when that factory is given."""

    def __init__(self, shape, n_flows=4, conv_net=None):
        super().__init__()
        (channels,) = shape
        mask = get_mask()
        network = (lambda: None) if conv_net is None else conv_net
        self.layers = nn.ModuleList()
        for _ in range(n_flows):
            self.layers.append(Coupling(c_in=channels, mask=mask, conv_net=network()))
            self.layers.append(Coupling(c_in=channels, mask=1 - mask, conv_net=network()))
        self.z_shape = (channels,)

    def forward(self, z, logdet, reverse=False, context=None):
        layers = reversed(self.layers) if reverse else self.layers
        for layer in layers:
            z, logdet = layer(z, logdet, reverse=reverse, context=context)
        return z, logdet


def log_logistic(x):
    """Elementwise log-density of the standard logistic distribution, log sigmoid(x) sigmoid(-x),
    which is also log of sigmoid's derivative at x."""
    return nn.functional.logsigmoid(x) + nn.functional.logsigmoid(-x)


class VariationalDequantization(nn.Module):
    """Flow++'s learned dequantization noise q(u | x) (Ho et al., 2019, sec. 3.1; question 3.4):
    u = sigmoid(g(e; x)) with e ~ Logistic(0, 1) and g two conditional checkerboard couplings whose
    networks (narrower than the flow's: the noise needs far less capacity than the image) also see
    the image x / 255, so that

        log q(u | x) = log Logistic(e) - log |det dg/de| - sum_i log sigmoid'(g_i).

    sigmoid of a logistic draw is uniform, and g starts as the identity, so training starts from the
    uniform dequantization exactly: u ~ U(0, 1)^784 and log q = 0."""

    def __init__(self, n_flows=1):
        super().__init__()
        self.flow = Flow([N_PIXELS], n_flows, conv_net=lambda: ConvNet(in_channels=3, channels=16, blocks=1))

    def forward(self, x, generator=None):
        """Noise u [B, 784] in (0, 1) for pixels x [B, 784] in 0..255, and log q(u | x) [B]."""
        uniform = torch.rand(x.shape, dtype=x.dtype, device=x.device, generator=generator).clamp(min=1e-7)
        e = torch.log(uniform) - torch.log1p(-uniform)  # a logistic draw, by inverting its CDF
        g, log_det = self.flow(e, x.new_zeros(len(x)), context=(x / 255).view(-1, 1, 28, 28))
        log_q = (log_logistic(e) - log_logistic(g)).sum(dim=1) - log_det
        return torch.sigmoid(g), log_q


class Model(nn.Module):
    """Dequantization, logit normalisation and the flow: ``forward`` gives log p(x) per image."""

    ALPHA = 1e-5  # keeps the logit's argument in [alpha/2, 1 - alpha/2]: no log(0), no infinite z

    def __init__(self, shape, coupling="mlp", dequantization="uniform"):
        super().__init__()
        self.flow = Flow(shape, conv_net=ConvNet if coupling == "conv" else None)
        self.dequantizer = VariationalDequantization() if dequantization == "variational" else None

    def dequantize(self, z, generator=None):
        """x + u, u ~ U[0, 1)^784 (Q3.4): a continuous density on [0, 256) whose likelihood lower-
        bounds the discrete model's, instead of point masses with unbounded density."""
        return z + torch.rand(z.shape, device=z.device, generator=generator)

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
        """log p(x) per image of x = dequantize(input), input [B, 784] with values 0..255. With
        variational dequantization, log p(x + u) - log q(u | x) for u ~ q(u | x): its expectation
        lower-bounds log P(input) as log p(x + u) does for uniform u, where log q = 0."""
        ldj = input.new_zeros(input.size(0))
        if self.dequantizer is None:
            z, log_q = self.dequantize(input, generator), 0
        else:
            noise, log_q = self.dequantizer(input, generator)
            z = input + noise
        z, ldj = self.logit_normalize(z, ldj)
        z, ldj = self.flow(z, ldj)
        return log_prior(z).sum(dim=1) + ldj - log_q

    @torch.no_grad()
    def sample(self, n_samples, generator=None):
        """Images [n, 784] in [0, 256): z ~ N(0, I) through the inverse flow and normalisation."""
        device = next(self.parameters()).device
        z = sample_prior((n_samples,) + self.flow.z_shape, device=device, generator=generator)
        ldj = torch.zeros(n_samples, device=device)
        z, ldj = self.flow(z, ldj, reverse=True)
        z, _ = self.logit_normalize(z, ldj, reverse=True)
        return z.clamp(0, 256 - 1e-3)


# ---------------------------------------------------------------- loss and epoch loop

def bits_per_dim(log_px):
    """-log2 p(x) / 784: nats to bits, per pixel. Includes the /256 and logit Jacobians, so it
    measures the density of the dequantized image on [0, 256)^784, the standard convention."""
    return -log_px / (N_PIXELS * math.log(2))


@torch.no_grad()
def importance_weighted_bpd(model, data, samples):
    """Bits/dim of the importance-weighted estimate over the dequantization noise, averaged over
    ``data``: -log2 (1/S) sum_s p(x + u_s) / q(u_s | x) / 784 with S = ``samples`` draws u_s ~ q
    (uniform: q = 1). A tighter bound on the discrete log P(x) than the one-sample bound, which it is
    at S = 1 (Burda et al., 2016; Ho et al., 2019, sec. 3.1), so that uniform and variational
    dequantization compare on the same footing. Fixed noise, as in ``epoch_iter``'s evaluation."""
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


def clip_gradients(model, max_norm):
    """clip_grad_norm_, without its pass that multiplies all 27M gradients by a coefficient of 1 when
    the norm is already below ``max_norm``, as it is on most steps."""
    parameters = [p for p in model.parameters() if p.grad is not None]
    norm = nn.utils.get_total_norm([p.grad for p in parameters])
    if norm > max_norm:
        nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)


def get_lr(step, total_steps, setting, steps_per_epoch):
    """The learning rate of training step ``step`` (counted from 0): a linear warm-up over
    ``warmup_epochs``, then a half-cosine decay to 0 at ``total_steps`` (or constant)."""
    warmup = setting["warmup_epochs"] * steps_per_epoch
    if step < warmup:
        return setting["lr"] * (step + 1) / warmup
    if not setting["cosine_decay"]:
        return setting["lr"]
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return setting["lr"] * 0.5 * (1 + math.cos(math.pi * progress))


def epoch_iter(model, data, optimizer, lr_at=None, clip=None, first_step=0):
    """Average bits/dim over ``data``. Trains when ``model.training``: step ``first_step + i`` runs at
    learning rate ``lr_at(first_step + i)`` (or the optimizer's own, without ``lr_at``) and clips the
    gradient norm to ``clip``. Otherwise it evaluates without gradients and with fixed dequantization
    noise, so validation numbers are deterministic."""
    device = next(model.parameters()).device
    total, count = torch.zeros((), device=device), 0
    noise = None if model.training else torch.Generator(device=device).manual_seed(0)
    for i, (imgs, _) in enumerate(tqdm(data, leave=False, disable=None)):
        imgs = imgs.to(device, non_blocking=True)
        with torch.set_grad_enabled(model.training):
            bpd = bits_per_dim(model(imgs, generator=noise))
            loss = bpd.mean()
        if model.training:
            common.check_finite(loss, f"training step {first_step + i}")
            if lr_at is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(first_step + i)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                clip_gradients(model, clip)
            optimizer.step()
        total += bpd.detach().sum()
        count += len(imgs)
    return (total / count).item()


def run_epoch(model, data, optimizer, lr_at=None, clip=None, first_step=0):
    """One training pass and one validation pass: (train bpd, val bpd)."""
    traindata, valdata = data
    model.train()
    with common.training_precision():
        train_bpd = epoch_iter(model, traindata, optimizer, lr_at, clip, first_step)
    model.eval()
    val_bpd = epoch_iter(model, valdata, optimizer)
    return train_bpd, val_bpd


# ---------------------------------------------------------------- plotting

def save_bpd_plot(train_curve, val_curve, filename):
    """Bits/dim per epoch against the assignment's bar of 1.85, on the range that matters: the first
    epochs' values far above the bar are cut off at 2 bits/dim, unless the whole run stays above."""
    values = [*train_curve, *val_curve]
    low, high = min(values), max(values)
    top = high if low > 1.9 else min(high, 2.0)
    common.save_curves({"train": train_curve, "validation": val_curve}, filename,
                       ylabel="bits per dimension", start=1, references={"assignment's bar": 1.85},
                       ylim=(low - 0.02, top + 0.02))


def sample_images(model, n, seed=0):
    """``n`` samples as pixel images [n, 784] in [0, 1] on the CPU: floored to the 256 grey levels the
    dequantization spread out, drawn 1,000 at a time with a seeded generator."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    chunks = [model.sample(min(1000, n - i), generator) for i in range(0, n, 1000)]
    return (torch.cat(chunks).floor() / 255).cpu()


def save_samples(model, stem, n=64, seed=0):
    common.save_image_grid(sample_images(model, n, seed), stem, nrow=8)


def load_sampler(checkpoint_path, device="cpu"):
    """``sample(n, seed=0)`` -> [n, 784] images in [0, 1] (floored to pixels)."""
    saved = common.load_checkpoint(checkpoint_path, device)
    args = saved["args"]
    model = Model([N_PIXELS], coupling=args["coupling"], dequantization=args["dequantization"]).to(device)
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

def parse_args(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--epochs", type=common.positive_int, default=40,
                        help="number of epochs (default 40)")
    parser.add_argument("--coupling", default="mlp", choices=["mlp", "conv"],
                        help="network of each coupling: the template's MLP, or a small convolutional "
                             "network (ConvNet) trained as CONV_TRAINING says (default mlp)")
    parser.add_argument("--dequantization", default="uniform", choices=["uniform", "variational"],
                        help="uniform noise, or Flow++'s learned q(u|x) (default uniform)")
    return common.add_run_args(parser, out="results/nf").parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run = common.Run(args)
    setting = TEMPLATE if args.template else OURS | (CONV_TRAINING if args.coupling == "conv" else {})
    traindata, valdata, testdata = mnist(run.data_root, batch_size=setting["batch_size"])
    model = Model([N_PIXELS], coupling=args.coupling, dequantization=args.dequantization).to(run.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=setting["lr"], fused=True)
    run.restore(model=model, optimizer=optimizer)
    if run.epoch == 0:
        save_samples(model, run.out / "samples_start")

    steps = len(traindata)
    lr_at = lambda step: get_lr(step, args.epochs * steps, setting, steps)  # noqa: E731
    for epoch in run.epochs(args.epochs):
        with run.timed(len(traindata.dataset)):
            train_bpd, val_bpd = run_epoch(model, (traindata, valdata), optimizer, lr_at, setting["clip"],
                                           first_step=(epoch - 1) * steps)
        run.record(train_bpd=train_bpd, val_bpd=val_bpd)
        (run.out / "epochs").mkdir(exist_ok=True)
        save_image(sample_images(model, 64).reshape(-1, 1, 28, 28),
                   run.out / "epochs" / f"epoch_{epoch:02d}.png", nrow=8, padding=2, pad_value=1.0)
        if epoch == args.epochs // 2:
            save_samples(model, run.out / "samples_halfway")
        run.save(model=model, optimizer=optimizer)

    save_samples(model, run.out / "samples_end")
    save_bpd_plot(run.curves["train_bpd"], run.curves["val_bpd"], run.out / "bpd")
    run.finish(model, weights={"model": model}, setting=setting, **evaluate(model, testdata, run))


if __name__ == "__main__":
    common.cli(main)
