"""Variational auto-encoder on binarized MNIST (assignment 3, part 1: questions 1.12-1.15, numbers for 1.4).

    python a3_vae_template.py                                 # z = 20, into results/vae
    python a3_vae_template.py --zdim 2 --out results/vae_z2   # z = 2, adds the learned manifold

The defaults are the tuned setting behind the committed numbers: encoder and decoder with two hidden
layers of 500 ReLU units, training images binarized afresh every epoch (dynamic binarization), Adam
(learning rate 1e-3, batches of 128) with the learning rate decayed to zero along a half cosine, and the
KL term warmed up linearly from 0 to 1 over the first 5 epochs. Validation and test use the fixed
binarization of datasets.bmnist. Measured with these defaults at z = 20: test negative ELBO 93.8 nats and
importance-sampled negative log-likelihood 89.7 nats (K = 500), about 3.5 s per epoch on 2 CPU cores.
In the tuning runs (40 epochs each; these defaults: 93.9 / 89.7 nats) one hidden layer gave 98.3 / 94.1,
a fixed training binarization 95.2 / 90.7, no warm-up 95.6 / 92.1 and a constant learning rate 95.7 / 90.0.

Everything lands in --out: ``checkpoint.pt`` (written after every epoch; ``--resume`` continues from it,
and resuming a finished run only redraws the figures and metrics), ``train.log``, and as PNG + PDF: the
train and validation negative ELBO per epoch from the untrained model on (``negative_elbo``, and
``negative_elbo_zoom`` without epoch 0), Bernoulli samples and their means before training, halfway and
at the end (``samples_epochNNN``, ``means_epochNNN``), and for z = 2 the learned manifold
(``manifold``). ``metrics.json`` holds the run's details, the curves, the test negative ELBO and the
importance-sampled test negative log-likelihood, the naive Monte-Carlo study of question 1.4, and the
sample evaluation of the ``evaluation`` package when it is importable.
"""

import argparse
import contextlib
import math
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import norm
from tqdm import tqdm

import common
from datasets.bmnist import bmnist

try:  # written separately; the VAE trains and reports without it
    import evaluation
    EVALUATION_IMPORT_ERROR = None
except ImportError as error:
    evaluation = None
    EVALUATION_IMPORT_ERROR = error

IMAGE_DIM = 28 * 28
NAIVE_MC_SAMPLE_COUNTS = (10, 100, 1_000, 10_000)
NAIVE_MC_IMAGES = 5
NAIVE_MC_REPEATS = 10
EVALUATION_SAMPLES = 10_000
ROWS_PER_DECODER_CALL = 8192  # bounds memory when K samples of z are decoded for a batch of images


# ---------------------------------------------------------------- model

def mlp(in_dim, hidden_dim, out_dim, hidden_layers):
    layers = []
    for _ in range(hidden_layers):
        layers += [nn.Linear(in_dim, hidden_dim), nn.ReLU()]
        in_dim = hidden_dim
    return nn.Sequential(*layers, nn.Linear(in_dim, out_dim))


class Encoder(nn.Module):
    """q(z|x) = N(z; mean(x), diag(std(x)^2)), with std = exp(log std) so that it is always > 0."""

    def __init__(self, hidden_dim=500, z_dim=20, hidden_layers=2):
        super().__init__()
        self.net = mlp(IMAGE_DIM, hidden_dim, 2 * z_dim, hidden_layers)

    def forward(self, input):
        # float(): under bf16 autocast the matmuls' output is bf16; exp, the KL and the sample of z
        # are computed in fp32 from here on.
        mean, log_std = self.net(input.reshape(-1, IMAGE_DIM)).float().chunk(2, dim=-1)
        return mean, log_std.exp()


class Decoder(nn.Module):
    """p(x|z) = prod over pixels of Bernoulli(x_m; sigmoid(logits(z))_m)."""

    def __init__(self, hidden_dim=500, z_dim=20, hidden_layers=2):
        super().__init__()
        self.net = mlp(z_dim, hidden_dim, IMAGE_DIM, hidden_layers)

    def logits(self, z):
        """What the loss uses: log-likelihoods from logits never take log(0). Always fp32, also when
        the matmuls run in bf16, so the loss sums 784 pixels at full precision."""
        return self.net(z).float()

    def forward(self, input):
        """The Bernoulli means [B, 784], in (0, 1)."""
        return torch.sigmoid(self.logits(input))


class VAE(nn.Module):
    """p(z) = N(0, I), the decoder's p(x|z), and the encoder's q(z|x) to train them by the ELBO."""

    def __init__(self, hidden_dim=500, z_dim=20, hidden_layers=2):
        super().__init__()
        self.config = {"hidden_dim": hidden_dim, "z_dim": z_dim, "hidden_layers": hidden_layers}
        self.z_dim = z_dim
        self.encoder = Encoder(hidden_dim, z_dim, hidden_layers)
        self.decoder = Decoder(hidden_dim, z_dim, hidden_layers)

    def loss_terms(self, input):
        """Per image, the assignment's two terms of the negative ELBO: the reconstruction loss
        L_recon = -E_q(z|x)[log p(x|z)], estimated with one reparameterised sample z = mean + std * eps,
        eps ~ N(0, I), so that gradients reach the encoder through z; and the regularisation loss
        L_reg = KL(q(z|x) || p(z)), in closed form. Returns (L_recon [B], L_reg [B])."""
        x = input.reshape(-1, IMAGE_DIM)
        mean, std = self.encoder(x)
        z = mean + std * torch.randn_like(std)
        return reconstruction_loss(self.decoder.logits(z), x), kl_to_standard_normal(mean, std)

    def forward(self, input):
        """The batch's average negative ELBO: -ELBO = L_recon + L_reg, since
        ELBO = E_q(z|x)[log p(x|z)] - KL(q(z|x) || p(z)) <= log p(x)."""
        reconstruction, regularisation = self.loss_terms(input)
        return (reconstruction + regularisation).mean()

    @torch.no_grad()
    def sample(self, n_samples, generator=None):
        """Ancestral samples: z ~ p(z) = N(0, I), then x ~ p(x|z). Returns (sampled_ims, im_means),
        each [n_samples, 784]: binary images and the Bernoulli means they were drawn from."""
        device = next(self.parameters()).device
        z = torch.randn(n_samples, self.z_dim, generator=generator, device=device)
        im_means = self.decoder(z)
        sampled_ims = torch.bernoulli(im_means, generator=generator)
        return sampled_ims, im_means


# ---------------------------------------------------------------- loss and likelihood estimates

def reconstruction_loss(logits, x):
    """-log p(x|z) = -sum_m [x_m log sigma(l_m) + (1 - x_m) log(1 - sigma(l_m))], summed over the 784
    pixels, from the logits l (binary_cross_entropy_with_logits works in log-sigmoid space)."""
    logits, x = torch.broadcast_tensors(logits, x)
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


def kl_to_standard_normal(mean, std):
    """KL(N(mean, diag std^2) || N(0, I)) = sum_d [(std_d^2 + mean_d^2 - 1) / 2 - log std_d]."""
    return (0.5 * (std.square() + mean.square() - 1) - std.log()).sum(-1)


def log_mean_exp(draw_log_weights, n_samples):
    """log (1/K) sum_k exp(w_k), and the mean of the w_k, for each of B images, with K = n_samples
    log-weights drawn in chunks by ``draw_log_weights(k) -> [k, B]`` (B = ``draw_log_weights.batch``)
    so that no more than ROWS_PER_DECODER_CALL images are decoded at once. logsumexp keeps likelihoods
    like e^-90 from underflowing."""
    log_weights = []
    drawn = 0
    while drawn < n_samples:
        k = min(n_samples - drawn, max(1, ROWS_PER_DECODER_CALL // draw_log_weights.batch))
        log_weights.append(draw_log_weights(k))
        drawn += k
    log_weights = torch.cat(log_weights)
    return log_weights.logsumexp(0) - math.log(n_samples), log_weights.mean(0)


class ImportanceWeights:
    """log w = log p(x, z) - log q(z|x) for z ~ q(z|x): the proposal is the encoder's posterior.

    (1/K) sum_k w_k is an unbiased estimate of p(x), so by Jensen log of it is a lower bound on log p(x)
    that tightens as K grows; at K = 1 it is the ELBO's one-sample estimate.
    """

    def __init__(self, model, x, generator=None):
        self.model = model
        self.x = x.reshape(-1, IMAGE_DIM)
        self.batch = len(self.x)
        self.mean, self.std = model.encoder(self.x)
        self.generator = generator

    def __call__(self, k):
        eps = torch.randn((k, *self.mean.shape), generator=self.generator, device=self.mean.device)
        z = self.mean + self.std * eps
        log_px_given_z = -reconstruction_loss(self.model.decoder.logits(z), self.x)
        # log p(z) - log q(z|x): (z - mean) / std = eps, and the (2 pi)^(-D/2) factors cancel.
        log_pz_over_qz = (0.5 * (eps.square() - z.square()) + self.std.log()).sum(-1)
        return log_px_given_z + log_pz_over_qz


class PriorWeights:
    """log w = log p(x|z) for z ~ p(z): the naive Monte-Carlo estimate of question 1.4,
    log p(x) ~ log (1/S) sum_s p(x|z_s). One set of z serves every image in ``x``."""

    def __init__(self, model, x, generator=None):
        self.model = model
        self.x = x.reshape(-1, IMAGE_DIM)
        self.batch = len(self.x)
        self.generator = generator

    def __call__(self, k):
        z = torch.randn(k, 1, self.model.z_dim, generator=self.generator, device=self.x.device)
        return -reconstruction_loss(self.model.decoder.logits(z), self.x)


@torch.inference_mode()
def test_bounds(model, data, n_samples, generator=None):
    """(negative ELBO, negative log-likelihood), nats averaged over the images of ``data``, both from
    K = n_samples importance samples per image: -log (1/K) sum_k w_k estimates -log p(x), and the mean
    of the same log-weights estimates the ELBO with K times less variance than one sample."""
    device = next(model.parameters()).device
    negative_elbo = torch.zeros((), device=device)
    negative_log_likelihood = torch.zeros((), device=device)
    n_images = 0
    for x in tqdm(data, desc="importance sampling", leave=False, disable=None):
        x = x.to(device).reshape(-1, IMAGE_DIM)
        log_likelihood, elbo = log_mean_exp(ImportanceWeights(model, x, generator), n_samples)
        negative_elbo -= elbo.sum()
        negative_log_likelihood -= log_likelihood.sum()
        n_images += len(x)
    return negative_elbo.item() / n_images, negative_log_likelihood.item() / n_images


@torch.inference_mode()
def naive_mc_study(model, images, sample_counts, repeats, generator=None):
    """Question 1.4: log p(x) for a few images, estimated ``repeats`` times with S samples from the prior
    (naive) and with S samples from q(z|x) (importance sampling), for each S. The naive estimate needs
    some z_s that explains x, which the prior almost never proposes, so it stays far below log p(x)
    with a large spread even at S = 10,000."""
    rows = []
    for n_samples in sample_counts:
        naive = torch.stack([log_mean_exp(PriorWeights(model, images, generator), n_samples)[0]
                             for _ in range(repeats)])
        importance = torch.stack([log_mean_exp(ImportanceWeights(model, images, generator), n_samples)[0]
                                  for _ in range(repeats)])
        rows.append({
            "samples": n_samples,
            "naive_mean": naive.mean(0).tolist(),
            "naive_std": naive.std(0).tolist(),
            "importance_mean": importance.mean(0).tolist(),
            "importance_std": importance.std(0).tolist(),
        })
    return {"images": len(images), "repeats": repeats, "unit": "log-likelihood, nats",
            "rows": rows}


# ---------------------------------------------------------------- epoch loop

def epoch_iter(model, data, optimizer, kl_weight=(1.0, 1.0), precision="fp32"):
    """One pass over ``data``; returns the average negative ELBO per image (nats).

    In training mode every batch takes an optimizer step on L_recon + beta * L_reg, with beta rising
    linearly from kl_weight[0] to kl_weight[1] over the epoch (the KL warm-up: the encoder first learns
    to code images before the prior pulls its codes together), with the matmuls in ``precision``. The
    value returned is always the true negative ELBO, beta = 1. In evaluation mode no gradients are
    computed and everything runs in fp32.
    """
    device = next(model.parameters()).device
    betas = torch.linspace(*kl_weight, len(data) + 1)[1:].tolist()
    context = contextlib.nullcontext() if model.training else torch.inference_mode()
    with context:
        total = torch.zeros((), device=device)
        n_images = 0
        for step, (beta, batch) in enumerate(zip(betas, tqdm(data, leave=False, disable=None), strict=True)):
            x = batch.to(device).reshape(-1, IMAGE_DIM)
            # Only the forward pass: autocast caches its bf16 copies of the weights until its region
            # ends, so a region around the optimizer step too would keep using the stale copies.
            with common.autocast(precision if model.training else "fp32", device):
                reconstruction, regularisation = model.loss_terms(x)
            if model.training:
                loss = (reconstruction + beta * regularisation).mean()
                common.check_finite(loss, f"training batch {step}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            total += (reconstruction + regularisation).detach().sum()
            n_images += len(x)
    return total.item() / n_images


def run_epoch(model, data, optimizer, kl_weight=(1.0, 1.0), precision="fp32"):
    """Train one epoch on data[0], then evaluate on data[1]. Returns (train, val) negative ELBO."""
    traindata, valdata = data
    model.train()
    train_elbo = epoch_iter(model, traindata, optimizer, kl_weight, precision)
    model.eval()
    val_elbo = epoch_iter(model, valdata, optimizer)
    return train_elbo, val_elbo


def learning_rate(epoch, epochs, initial):
    """Adam's step size in ``epoch`` (counted from 1 to ``epochs``): ``initial`` decayed towards 0 along
    a half cosine. A function of the epoch rather than a scheduler's state, so a resumed run picks it
    up from the epoch alone, also with a changed --epochs or --lr."""
    return initial * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))


def kl_weights(epoch, warmup_epochs):
    """beta at the start and end of ``epoch`` (counted from 1): 0 to 1 linearly over warmup_epochs."""
    if warmup_epochs == 0:
        return 1.0, 1.0
    return min(1.0, (epoch - 1) / warmup_epochs), min(1.0, epoch / warmup_epochs)


# ---------------------------------------------------------------- figures

def save_elbo_plot(train_curve, val_curve, filename):
    """Negative ELBO per epoch from epoch 0 (the untrained model), and a second figure from epoch 1 on,
    since the untrained model's ~540 nats flatten everything after it."""
    curves = {"train": train_curve, "validation": val_curve}
    common.save_curves(curves, filename, ylabel="negative ELBO (nats)",
                       title="negative ELBO per epoch (epoch 0: before training)")
    common.save_curves({label: values[1:] for label, values in curves.items()}, f"{filename}_zoom",
                       ylabel="negative ELBO (nats)", title="negative ELBO per epoch", start=1)


def save_sample_grids(samples, out):
    """One Bernoulli-sample grid and one mean grid for every epoch in ``samples``."""
    last = max(samples)
    for epoch, images in samples.items():
        sampled_ims, im_means = (t.reshape(-1, 1, 28, 28) for t in images)
        when = "before training" if epoch == 0 else "end of training" if epoch == last else "halfway"
        common.save_image_grid(sampled_ims, out / f"samples_epoch{epoch:03d}", nrow=10,
                               title=f"Bernoulli samples, epoch {epoch} ({when})")
        common.save_image_grid(im_means, out / f"means_epoch{epoch:03d}", nrow=10,
                               title=f"Bernoulli means, epoch {epoch} ({when})")


@torch.inference_mode()
def save_manifold(model, stem, steps=20):
    """Question 1.15: decoder means over a steps x steps grid of z. The grid is norm.ppf of the
    probabilities (i + 1/2) / steps, the midpoints of equal-mass slices of N(0, 1): every cell stands
    for the same share of the prior's mass (at steps = 20, centres from its 2.5% to its 97.5% quantile)."""
    values = norm.ppf((np.arange(steps) + 0.5) / steps)
    z1, z2 = np.meshgrid(values, values[::-1])  # z2 grows upwards, as on a plot's y axis
    z = torch.tensor(np.stack([z1.ravel(), z2.ravel()], axis=1), dtype=torch.float32,
                     device=next(model.parameters()).device)
    grid = common.image_grid(model.decoder(z).cpu().reshape(-1, 1, 28, 28), nrow=steps, padding=0)
    fig, ax = plt.subplots(figsize=(6.5, 6.5))
    extent = (0, steps, 0, steps)
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, extent=extent, interpolation="nearest")
    ticks = np.arange(0, steps, 3)
    labels = [f"{v:.2f}" for v in values[ticks]]
    ax.set_xticks(ticks + 0.5, labels)
    ax.set_yticks(ticks + 0.5, labels)
    ax.set_xlabel("$z_1$")
    ax.set_ylabel("$z_2$")
    ax.set_title("decoder means over the prior's quantiles (the learned manifold)", fontsize=10)
    common.save_figure(fig, stem)


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=common.positive_int, default=40, help="training epochs")
    parser.add_argument("--zdim", type=common.positive_int, default=20, help="dimension of the latent z")
    parser.add_argument("--hidden-dim", type=common.positive_int, default=500,
                        help="width of each of the two hidden layers of encoder and decoder")
    parser.add_argument("--lr", type=common.positive_float, default=1e-3,
                        help="Adam's initial learning rate, decayed to 0 along a half cosine")
    parser.add_argument("--batch-size", type=common.positive_int, default=128, help="training batch size")
    parser.add_argument("--warmup-epochs", type=common.non_negative_int, default=5,
                        help="epochs over which the KL term's weight rises linearly from 0 to 1")
    parser.add_argument("--importance-samples", type=common.positive_int, default=500,
                        help="K, samples of z per test image for the importance-sampled log-likelihood "
                             "(the assignment asks for K >= 500)")
    common.add_precision_arg(parser)
    common.add_common_args(parser, out="results/vae")
    return parser.parse_args(argv)


def make_optimizer(model, args):
    """Adam; fused=True does the whole update in one kernel instead of a dozen passes over memory."""
    return torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)


def main(argv=None):
    args = parse_args(argv)
    device, root = common.setup(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / "checkpoint.pt"
    resuming = args.resume and checkpoint_path.exists()
    log = common.run_log(out, fresh=not resuming)

    train_data, val_data, test_data = bmnist(root, args.batch_size, dynamic=True)
    model = VAE(args.hidden_dim, args.zdim).to(device)
    precision = common.training_precision(args.precision, device)
    log(f"training matmuls in {precision} on {device}")
    optimizer = make_optimizer(model, args)
    # The sample grids reuse one noise draw, so that epochs can be compared image by image.
    grid_noise = torch.Generator(device)

    def grid_samples():
        model.eval()
        sampled_ims, im_means = model.sample(100, generator=grid_noise.manual_seed(args.seed))
        return sampled_ims.cpu().to(torch.uint8), im_means.cpu()

    def save():
        common.save_checkpoint(checkpoint_path, model=model, optimizer=optimizer, config=model.config,
                               epoch=len(curves["wall_time_s"]) - 1, curves=curves, samples=samples,
                               stopwatch=stopwatch.state())

    if resuming:
        saved = common.load_checkpoint(checkpoint_path, device)
        if saved["config"] != model.config:
            raise SystemExit(f"{checkpoint_path} holds a model with {saved['config']}, but the flags ask "
                             f"for {model.config}; use the same flags or another --out")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        curves, samples = saved["curves"], saved["samples"]
        stopwatch = common.Stopwatch(saved["stopwatch"])
        log(f"resumed from {checkpoint_path} after epoch {len(curves['wall_time_s']) - 1}")
    else:
        model.eval()
        stopwatch = common.Stopwatch()
        curves = {"train_negative_elbo": [epoch_iter(model, train_data, None)],
                  "val_negative_elbo": [epoch_iter(model, val_data, None)], "wall_time_s": [0.0]}
        samples = {0: grid_samples()}
        save()
        log(f"epoch 0 (untrained): train {curves['train_negative_elbo'][0]:.2f}  "
            f"val {curves['val_negative_elbo'][0]:.2f}")

    for epoch in range(len(curves["wall_time_s"]), args.epochs + 1):
        beta = kl_weights(epoch, args.warmup_epochs)
        lr = learning_rate(epoch, args.epochs, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        started = stopwatch.seconds
        try:
            with stopwatch:
                train_elbo, val_elbo = run_epoch(model, (train_data, val_data), optimizer, beta,
                                                 precision)
        except common.NonFiniteLossError as error:
            raise SystemExit(f"epoch {epoch}: {error}") from error
        stopwatch.count(len(train_data.dataset))
        curves["train_negative_elbo"].append(train_elbo)
        curves["val_negative_elbo"].append(val_elbo)
        curves["wall_time_s"].append(stopwatch.seconds)
        if epoch in (max(1, args.epochs // 2), args.epochs):
            samples[epoch] = grid_samples()
        save()
        log(f"epoch {epoch}/{args.epochs}: train {train_elbo:.2f}  val {val_elbo:.2f}  "
            f"(lr {lr:.2e}, KL weight {beta[1]:.2f}, {stopwatch.seconds - started:.1f} s)")

    model.eval()
    save_elbo_plot(curves["train_negative_elbo"], curves["val_negative_elbo"], out / "negative_elbo")
    save_sample_grids(samples, out)
    if args.zdim == 2:
        save_manifold(model, out / "manifold")

    metrics = {
        **common.run_info(args, device),
        "n_params": sum(p.numel() for p in model.parameters()),
        "training_precision": precision,
        "epochs_completed": len(curves["wall_time_s"]) - 1,
        "curves": curves,
        "wall_time_s": stopwatch.seconds,
        "images_per_s": stopwatch.images_per_second,
        **measure(model, test_data, args, root, log),
    }
    common.write_json(out / "metrics.json", metrics)
    log(f"wrote {out / 'metrics.json'}")


def measure(model, test_data, args, root, log):
    """The test set's negative ELBO and importance-sampled log-likelihood, the naive Monte-Carlo study,
    and the evaluation package's measures of samples. All noise is seeded, so that rerunning on the same
    checkpoint gives the same numbers."""
    device = next(model.parameters()).device
    noise = torch.Generator(device).manual_seed(args.seed)
    started = time.perf_counter()
    negative_elbo, nll = test_bounds(model, test_data, args.importance_samples, noise)
    log(f"test: negative ELBO {negative_elbo:.2f}, negative log-likelihood {nll:.2f} "
        f"(importance sampling, K = {args.importance_samples}, {time.perf_counter() - started:.0f} s)")
    first_images = next(iter(test_data))[:NAIVE_MC_IMAGES].to(device)
    results = {
        "test": {"negative_elbo": negative_elbo, "nll_importance": nll,
                 "importance_samples": args.importance_samples},
        "naive_mc": naive_mc_study(model, first_images, NAIVE_MC_SAMPLE_COUNTS, NAIVE_MC_REPEATS, noise),
    }
    if evaluation is None:
        log(f"sample evaluation skipped: the evaluation package is not importable "
            f"({EVALUATION_IMPORT_ERROR})")
    else:
        images = model.sample(EVALUATION_SAMPLES, generator=noise)[1].cpu()
        results["evaluation"] = evaluation.evaluate_samples(images, root=root, device=str(device))
    return results


def load_sampler(checkpoint_path, device="cpu"):
    """sample(n) -> [n, 784] decoder means on the CPU, in [0, 1], from the model in ``checkpoint_path``."""
    saved = common.load_checkpoint(checkpoint_path, device, restore_rng=False)
    model = VAE(**saved["config"]).to(device)
    model.load_state_dict(saved["model"])
    model.eval()

    def sample(n):
        return model.sample(n)[1].cpu()

    return sample


if __name__ == "__main__":
    main()
