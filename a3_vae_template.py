"""Part 1: a variational auto-encoder on binarized MNIST (assignment questions 1.4 and 1.12-1.15).

    python a3_vae_template.py                                  # z = 20, into results/vae/
    python a3_vae_template.py --zdim 2 --out results/vae_z2    # z = 2, adds the learned manifold

Bernoulli decoder, Gaussian encoder, closed-form KL and a one-sample reparameterised reconstruction
term (Kingma & Welling, 2014), trained with Adam (learning rate 1e-3, batches of 128) for 40 epochs.
Beyond the template: encoder and decoder with two hidden layers of 500 ReLU units instead of one;
training images binarized afresh every epoch (dynamic binarization) instead of once; the KL term's
weight warmed up from 0 to 1 over the first 5 epochs; and the learning rate decayed to 0 along a
half cosine. ``--template`` trains the template's model the template's way (one hidden layer, the
fixed binarization, no warm-up, a constant learning rate).

Outputs in --out (PNG + PDF): the train and validation negative ELBO per epoch (``negative_elbo``,
and ``negative_elbo_zoom`` without the untrained epoch 0), Bernoulli samples and their means before
training, halfway and at the end (``samples_epochNNN``, ``means_epochNNN``), for z = 2 the learned
manifold (``manifold``); ``metrics.json`` with the validation and test negative ELBO and
importance-sampled negative log-likelihood, the naive Monte-Carlo study of question 1.4 and the
sample measures of ``evaluation``.
"""

import contextlib
import math

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import norm
from tqdm import tqdm

import common
import evaluation
from datasets.bmnist import bmnist

IMAGE_DIM = 28 * 28
HIDDEN_DIM = 500
BATCH_SIZE = 128
LEARNING_RATE = 1e-3
# Our training, and the course template's, which --template restores.
OURS = {"hidden_layers": 2, "dynamic_binarization": True, "warmup_epochs": 5, "cosine_decay": True}
TEMPLATE = {"hidden_layers": 1, "dynamic_binarization": False, "warmup_epochs": 0, "cosine_decay": False}
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
        mean, log_std = self.net(input.reshape(-1, IMAGE_DIM)).chunk(2, dim=-1)
        return mean, log_std.exp()


class Decoder(nn.Module):
    """p(x|z) = prod over pixels of Bernoulli(x_m; sigmoid(logits(z))_m)."""

    def __init__(self, hidden_dim=500, z_dim=20, hidden_layers=2):
        super().__init__()
        self.net = mlp(z_dim, hidden_dim, IMAGE_DIM, hidden_layers)

    def logits(self, z):
        """What the loss uses: log-likelihoods from logits never take log(0)."""
        return self.net(z)

    def forward(self, input):
        """The Bernoulli means [B, 784], in (0, 1)."""
        return torch.sigmoid(self.logits(input))


class VAE(nn.Module):
    """p(z) = N(0, I), the decoder's p(x|z), and the encoder's q(z|x) to train them by the ELBO."""

    def __init__(self, hidden_dim=500, z_dim=20, hidden_layers=2):
        super().__init__()
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
    that tightens as K grows (Burda et al., 2016); at K = 1 it is the ELBO's one-sample estimate.
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
def importance_bounds(model, data, n_samples, generator=None):
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

def epoch_iter(model, data, optimizer, kl_weight=(1.0, 1.0)):
    """One pass over ``data``; returns the average negative ELBO per image (nats).

    In training mode every batch takes an optimizer step on L_recon + beta * L_reg, with beta rising
    linearly from kl_weight[0] to kl_weight[1] over the epoch (the KL warm-up: the encoder first learns
    to code images before the prior pulls its codes together). The value returned is always the true
    negative ELBO, beta = 1. In evaluation mode no gradients are computed.
    """
    device = next(model.parameters()).device
    betas = torch.linspace(*kl_weight, len(data) + 1)[1:].tolist()
    total = torch.zeros((), device=device)
    n_images = 0
    with contextlib.nullcontext() if model.training else torch.inference_mode():
        for step, (beta, batch) in enumerate(zip(betas, tqdm(data, leave=False, disable=None), strict=True)):
            x = batch.to(device).reshape(-1, IMAGE_DIM)
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


def run_epoch(model, data, optimizer, kl_weight=(1.0, 1.0)):
    """Train one epoch on data[0], then evaluate on data[1]. Returns (train, val) negative ELBO."""
    traindata, valdata = data
    model.train()
    with common.training_precision():
        train_elbo = epoch_iter(model, traindata, optimizer, kl_weight)
    model.eval()
    val_elbo = epoch_iter(model, valdata, optimizer)
    return train_elbo, val_elbo


def get_lr(epoch, epochs, cosine_decay):
    """Adam's step size in ``epoch`` (counted from 1): LEARNING_RATE, decayed towards 0 along a half
    cosine when ``cosine_decay``. A pure function of the epoch, so a resumed run needs no state."""
    if not cosine_decay:
        return LEARNING_RATE
    return LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))


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
    common.save_curves(curves, filename, ylabel="negative ELBO (nats)")
    common.save_curves({label: values[1:] for label, values in curves.items()}, f"{filename}_zoom",
                       ylabel="negative ELBO (nats)", start=1)


@torch.no_grad()
def grid_samples(model, seed):
    """100 Bernoulli samples and their means, from the same noise at every epoch."""
    model.eval()
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    sampled_ims, im_means = model.sample(100, generator=generator)
    return sampled_ims.cpu().to(torch.uint8), im_means.cpu()


def save_sample_grids(samples, out):
    """One Bernoulli-sample grid and one mean grid for every epoch in ``samples``."""
    for epoch, (sampled_ims, im_means) in samples.items():
        common.save_image_grid(sampled_ims.reshape(-1, 1, 28, 28), out / f"samples_epoch{epoch:03d}", nrow=10)
        common.save_image_grid(im_means.reshape(-1, 1, 28, 28), out / f"means_epoch{epoch:03d}", nrow=10)


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
    fig, ax = plt.subplots(figsize=(4.2, 4.2), layout="constrained")
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, extent=(0, steps, 0, steps), interpolation="nearest")
    # Cell centres symmetric about 0, plus z = 0 itself, the boundary between the two middle cells.
    outer = np.array([0, steps // 4])
    positions = [*(outer + 0.5), steps / 2, *(steps - 0.5 - outer[::-1])]
    labels = [*(f"{v:.2f}" for v in values[outer]), "0", *(f"+{v:.2f}" for v in -values[outer[::-1]])]
    ax.set_xticks(positions, labels)
    ax.set_yticks(positions, labels)
    ax.set_xlabel("$z_1$")
    ax.set_ylabel("$z_2$")
    common.save_figure(fig, stem)


# ---------------------------------------------------------------- evaluation of the trained model

def evaluate(model, val_data, test_data, args, run):
    """The validation and test negative ELBO and importance-sampled negative log-likelihood (the
    validation numbers are the ones to choose settings by), the naive Monte-Carlo study of question
    1.4 and the sample measures of ``evaluation``. All noise is seeded: rerunning on the same
    checkpoint gives the same numbers. Rebuilt from weights (``--from_weights``), the importance-
    sampled bounds, minutes of CPU, keep the run's values; the study and the samples draw from
    generators of their own, so they come out the same either way."""
    model.eval()
    noise = torch.Generator(run.device).manual_seed(args.seed)
    results = {}
    for split, data in () if run.from_weights else (("validation", val_data), ("test", test_data)):
        negative_elbo, nll = importance_bounds(model, data, args.importance_samples, noise)
        results[split] = {"negative_elbo": negative_elbo, "nll_importance": nll,
                          "importance_samples": args.importance_samples}
        run.log(f"{split}: negative ELBO {negative_elbo:.2f}, negative log-likelihood {nll:.2f} nats "
                f"(importance sampling, K = {args.importance_samples})")
    first_images = next(iter(test_data))[:NAIVE_MC_IMAGES].to(run.device)
    results["naive_mc"] = naive_mc_study(model, first_images, NAIVE_MC_SAMPLE_COUNTS, NAIVE_MC_REPEATS,
                                         torch.Generator(run.device).manual_seed(args.seed + 1))
    sample_noise = torch.Generator(run.device).manual_seed(args.seed + 2)
    images = model.sample(EVALUATION_SAMPLES, generator=sample_noise)[1].cpu()
    results["evaluation"] = evaluation.evaluate_samples(images, root=run.data_root, device=run.device,
                                                        out=run.out)
    return results


def load_sampler(checkpoint_path, device="cpu"):
    """sample(n) -> [n, 784] decoder means on the CPU, in [0, 1], from the model in ``checkpoint_path``."""
    saved = common.load_checkpoint(checkpoint_path, device)
    setting = TEMPLATE if saved["args"]["template"] else OURS
    model = VAE(HIDDEN_DIM, saved["args"]["zdim"], setting["hidden_layers"]).to(device)
    model.load_state_dict(saved["state"]["model"])
    model.eval()
    return lambda n: model.sample(n)[1].cpu()


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--epochs", type=common.positive_int, default=40, help="training epochs (default 40)")
    parser.add_argument("--zdim", type=common.positive_int, default=20, help="dimension of z (default 20)")
    parser.add_argument("--importance_samples", type=common.positive_int, default=500,
                        help="K, samples of z per image for the log-likelihood estimate (default 500; "
                             "the assignment asks for K >= 500)")
    return common.add_run_args(parser, out="results/vae").parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run = common.Run(args)
    setting = TEMPLATE if args.template else OURS
    train_data, val_data, test_data = bmnist(run.data_root, BATCH_SIZE,
                                             dynamic=setting["dynamic_binarization"])
    model = VAE(HIDDEN_DIM, args.zdim, setting["hidden_layers"]).to(run.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, fused=True)
    samples = run.restore(model=model, optimizer=optimizer).get("samples", {})
    if not run.curves:  # a new run: the untrained model is epoch 0
        model.eval()
        run.record(train_negative_elbo=epoch_iter(model, train_data, None),
                   val_negative_elbo=epoch_iter(model, val_data, None))
        samples[0] = grid_samples(model, args.seed)
        run.save({"samples": samples}, model=model, optimizer=optimizer)

    for epoch in run.epochs(args.epochs):
        lr = get_lr(epoch, args.epochs, setting["cosine_decay"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        with run.timed(len(train_data.dataset)):
            train_elbo, val_elbo = run_epoch(model, (train_data, val_data), optimizer,
                                             kl_weights(epoch, setting["warmup_epochs"]))
        run.record(train_negative_elbo=train_elbo, val_negative_elbo=val_elbo)
        if epoch in (args.epochs // 2, args.epochs):
            samples[epoch] = grid_samples(model, args.seed)
        run.save({"samples": samples}, model=model, optimizer=optimizer)

    save_elbo_plot(run.curves["train_negative_elbo"], run.curves["val_negative_elbo"],
                   run.out / "negative_elbo")
    save_sample_grids(samples, run.out)
    if args.zdim == 2:
        save_manifold(model, run.out / "manifold")
    run.finish(model, weights={"model": model, "samples": samples},
               setting={**setting, "hidden_dim": HIDDEN_DIM, "batch_size": BATCH_SIZE, "lr": LEARNING_RATE},
               **evaluate(model, val_data, test_data, args, run))


if __name__ == "__main__":
    common.cli(main)
