"""Part 3: a RealNVP normalizing flow on MNIST (assignment questions 3.4-3.8).

x (pixels 0..255) is dequantized with uniform noise, scaled to [0, 1), squashed away from 0 and 1
and mapped to the real line by a logit, then through 8 affine coupling layers with alternating
checkerboard masks to z ~ N(0, I). Change of variables (Q3.1):

    log p(x) = sum_i log N(z_i; 0, 1) + log |det dz/dx|,

where the log-determinant adds up the scaling, the logit and every coupling. Reported as bits per
dimension, -log2 p(x) / 784, the likelihood of the dequantized image in [0, 256)^784.

    python a3_nf_template.py                 # full run (40 epochs) into results/nf/
    python a3_nf_template.py --resume        # continue an interrupted run (or redraw a finished one)
"""

import argparse
import math
from pathlib import Path

import torch
import torch.nn as nn
from torchvision.utils import save_image
from tqdm import tqdm

import common
from datasets.mnist import mnist

LOG_2PI = math.log(2 * math.pi)
N_PIXELS = 784


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

    so the Jacobian is triangular and log|det| = sum over the unmasked pixels of s.
    """

    def __init__(self, c_in, mask, n_hidden=1024):
        super().__init__()
        self.n_hidden = n_hidden
        self.register_buffer("mask", mask)
        self.nn = nn.Sequential(
            nn.Linear(c_in, n_hidden), nn.ReLU(),
            nn.Linear(n_hidden, n_hidden), nn.ReLU(),
            nn.Linear(n_hidden, 2 * c_in),
        )
        # Zero last layer: s = t = 0, so every coupling starts as the identity and training starts
        # from a well-conditioned flow.
        nn.init.zeros_(self.nn[-1].weight)
        nn.init.zeros_(self.nn[-1].bias)

    def scale_and_translation(self, z):
        # float(): under bf16 autocast the network's output is bf16; s, t, exp(s) and the log-det sum
        # are computed in fp32 from here on, whatever autocast's op lists say.
        log_scale, translation = self.nn(z * self.mask).float().chunk(2, dim=1)
        # tanh bounds the log-scale to (-1, 1) per layer, which keeps exp() and the inverse stable.
        inverse_mask = 1 - self.mask
        return torch.tanh(log_scale) * inverse_mask, translation * inverse_mask

    def forward(self, z, ldj, reverse=False):
        log_scale, translation = self.scale_and_translation(z)
        if not reverse:
            z = z * torch.exp(log_scale) + translation
            ldj = ldj + log_scale.sum(dim=1)
        else:
            z = (z - translation) * torch.exp(-log_scale)
            ldj = ldj - log_scale.sum(dim=1)
        return z, ldj


class Flow(nn.Module):
    """2 * n_flows couplings, alternating the checkerboard and its complement."""

    def __init__(self, shape, n_flows=4):
        super().__init__()
        (channels,) = shape
        mask = get_mask()
        self.layers = nn.ModuleList()
        for _ in range(n_flows):
            self.layers.append(Coupling(c_in=channels, mask=mask))
            self.layers.append(Coupling(c_in=channels, mask=1 - mask))
        self.z_shape = (channels,)

    def forward(self, z, logdet, reverse=False):
        layers = reversed(self.layers) if reverse else self.layers
        for layer in layers:
            z, logdet = layer(z, logdet, reverse=reverse)
        return z, logdet


class Model(nn.Module):
    """Dequantization, logit normalisation and the flow: ``forward`` gives log p(x) per image."""

    ALPHA = 1e-5  # keeps the logit's argument in [alpha/2, 1 - alpha/2]: no log(0), no infinite z

    def __init__(self, shape):
        super().__init__()
        self.flow = Flow(shape)

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
        """log p(x) per image of x = dequantize(input), input [B, 784] with values 0..255."""
        ldj = input.new_zeros(input.size(0))
        z = self.dequantize(input, generator)
        z, ldj = self.logit_normalize(z, ldj)
        z, ldj = self.flow(z, ldj)
        return log_prior(z).sum(dim=1) + ldj

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


def clip_gradients(model, max_norm):
    """clip_grad_norm_, without its pass that multiplies all 27M gradients by a coefficient of 1 when
    the norm is already below ``max_norm`` (as it is on most steps): 5-7 ms of a ~100 ms CPU step."""
    parameters = [p for p in model.parameters() if p.grad is not None]
    norm = nn.utils.get_total_norm([p.grad for p in parameters])
    if norm > max_norm:
        nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)


def epoch_iter(model, data, optimizer, scheduler=None, clip=None, epoch=0, precision="fp32"):
    """Average bits/dim over ``data``. Trains when ``model.training``, with the coupling networks'
    matmuls in ``precision``; otherwise evaluates in fp32 without gradients and with fixed
    dequantization noise, so validation numbers are deterministic."""
    device = next(model.parameters()).device
    total, count = torch.zeros((), device=device), 0
    noise = None if model.training else torch.Generator(device=device).manual_seed(0)
    precision = precision if model.training else "fp32"
    desc = f"epoch {epoch} {'train' if model.training else 'eval'}"
    for imgs, _ in tqdm(data, desc=desc, leave=False, disable=None):
        imgs = imgs.to(device, non_blocking=True)
        with torch.set_grad_enabled(model.training), common.autocast(precision, device):
            bpd = bits_per_dim(model(imgs, generator=noise))
            loss = bpd.mean()
        if model.training:
            common.check_finite(loss, f"epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                clip_gradients(model, clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        total += bpd.detach().sum()
        count += len(imgs)
    return (total / count).item()


def run_epoch(model, data, optimizer, scheduler=None, clip=None, epoch=0, precision="fp32"):
    """One training pass and one validation pass: (train bpd, val bpd)."""
    traindata, valdata = data
    model.train()
    train_bpd = epoch_iter(model, traindata, optimizer, scheduler, clip, epoch, precision)
    model.eval()
    val_bpd = epoch_iter(model, valdata, optimizer, epoch=epoch)
    return train_bpd, val_bpd


# ---------------------------------------------------------------- plotting

def save_bpd_plot(train_curve, val_curve, filename):
    common.save_curves({"train": train_curve, "validation": val_curve}, filename,
                       ylabel="bits per dimension", start=1, references={"assignment's bar": 1.85},
                       title="RealNVP on MNIST: negative log-likelihood")


def sample_images(model, n, seed=0):
    """``n`` samples as pixel images [n, 784] in [0, 1] on the CPU: floored to the 256 grey levels the
    dequantization spread out, drawn 1,000 at a time with a seeded generator."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    chunks = [model.sample(min(1000, n - i), generator) for i in range(0, n, 1000)]
    return (torch.cat(chunks).floor() / 255).cpu()


def save_samples(model, stem, title, n=64, seed=0):
    common.save_image_grid(sample_images(model, n, seed), stem, nrow=8, title=title)


# ---------------------------------------------------------------- main

def load_sampler(checkpoint_path, device="cpu"):
    """For the evaluation package: ``sample(n)`` -> [n, 784] images in [0, 1] (floored to pixels)."""
    payload = torch.load(checkpoint_path, map_location=device, weights_only=False)
    model = Model([N_PIXELS]).to(device)
    model.load_state_dict(payload["model"])
    model.eval()

    return lambda n, seed=0: sample_images(model, n, seed)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=common.positive_int, default=40, help="number of epochs")
    parser.add_argument("--batch-size", type=common.positive_int, default=256,
                        help="batch size (256: each step's AdamW update and bf16 weight casts pass "
                             "over all 27.7M parameters, so larger batches spread that cost over more "
                             "images)")
    parser.add_argument("--lr", type=common.positive_float, default=5e-4,
                        help="peak Adam learning rate (cosine decay to 0 after a warm-up)")
    parser.add_argument("--warmup", type=float, default=1.0, help="linear warm-up length in epochs")
    parser.add_argument("--clip", type=common.positive_float, default=100.0,
                        help="gradient-norm clipping threshold")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    common.add_precision_arg(parser)
    parser.add_argument("--eval-samples", type=common.positive_int, default=10_000,
                        help="samples scored by the evaluation package at the end")
    return common.add_common_args(parser, out="results/nf").parse_args(argv)


def make_optimizer(model, args):
    """AdamW; fused=True does the update of the 27M parameters in one pass over memory, 4x faster on
    a CPU than the multi-pass default."""
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)


def make_scheduler(optimizer, steps_per_epoch, args):
    """Linear warm-up then cosine decay to zero, stepped every batch."""
    warmup = max(1, int(args.warmup * steps_per_epoch))
    total = args.epochs * steps_per_epoch

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def main(argv=None):
    args = parse_args(argv)
    device, root = common.setup(args)
    out = Path(args.out)
    traindata, valdata, testdata = mnist(root, batch_size=args.batch_size)

    precision = common.training_precision(args.precision, device)
    model = Model([N_PIXELS]).to(device)
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, len(traindata), args)
    curves = {"train_bpd": [], "val_bpd": [], "wall_time_s": []}
    stopwatch, start = common.Stopwatch(), 0
    checkpoint = out / "checkpoint.pt"
    resuming = args.resume and checkpoint.exists()
    log = common.run_log(out, fresh=not resuming)
    if resuming:
        state = common.load_checkpoint(checkpoint, device, model=model, optimizer=optimizer,
                                       scheduler=scheduler)
        start, curves = state["epoch"], state["curves"]
        stopwatch = common.Stopwatch(state["stopwatch"])
        log(f"resumed from {checkpoint} after epoch {start}")
    info = common.run_info(args, device)
    log(f"training matmuls in {precision} on {device}")
    if start == 0:
        save_samples(model, out / "samples_start", "Before training (identity couplings)")

    for epoch in range(start, args.epochs):
        with stopwatch:
            train_bpd, val_bpd = run_epoch(model, (traindata, valdata), optimizer, scheduler,
                                           args.clip, epoch + 1, precision)
        stopwatch.count(len(traindata.dataset))
        done = epoch + 1
        curves["train_bpd"].append(train_bpd)
        curves["val_bpd"].append(val_bpd)
        curves["wall_time_s"].append(stopwatch.seconds)
        log(f"epoch {done}/{args.epochs}  train {train_bpd:.4f}  val {val_bpd:.4f} bits/dim  "
            f"{stopwatch.seconds / done:.1f} s/epoch")
        (out / "epochs").mkdir(parents=True, exist_ok=True)
        save_image(sample_images(model, 64).reshape(-1, 1, 28, 28),
                   out / "epochs" / f"epoch_{done:02d}.png", nrow=8, padding=2, pad_value=1.0)
        if done == args.epochs // 2:
            save_samples(model, out / "samples_halfway", f"After {done} of {args.epochs} epochs")
        common.save_checkpoint(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler,
                               epoch=done, curves=curves, stopwatch=stopwatch.state(), args=vars(args))

    save_samples(model, out / "samples_end", f"After {args.epochs} epochs")
    save_bpd_plot(curves["train_bpd"], curves["val_bpd"], out / "bpd")
    model.eval()
    metrics = {
        **info,
        "n_params": sum(p.numel() for p in model.parameters()),
        "training_precision": precision,
        "epochs_completed": len(curves["train_bpd"]),
        "curves": curves,
        "wall_time_s": stopwatch.seconds,
        "images_per_s": stopwatch.images_per_second,
        "test": {"bpd": epoch_iter(model, testdata, None)},
    }
    log(f"test {metrics['test']['bpd']:.4f} bits/dim")
    try:
        import evaluation
    except ImportError:
        log("evaluation package not available: skipping sample metrics")
    else:
        images = load_sampler(checkpoint, device)(args.eval_samples)
        metrics["evaluation"] = evaluation.evaluate_samples(images, root=root, device=device)
    common.write_json(out / "metrics.json", metrics)
    log(f"done: {stopwatch.seconds / 60:.1f} min of training; outputs in {out}")
    return metrics


if __name__ == "__main__":
    main()
