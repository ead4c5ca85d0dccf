"""Part 1: a variational auto-encoder on binarized MNIST (assignment questions 1.4 and 1.12-1.15).

    python a3_vae_template.py                                  # z = 20, into results/vae/
    python a3_vae_template.py --zdim 2 --out results/vae_z2    # z = 2, adds the learned manifold
    python a3_vae_template.py --posterior iaf --iw_samples 5   # beyond the assignment (see below)

Bernoulli decoder, Gaussian encoder, closed-form KL and a one-sample reparameterised reconstruction
term (Kingma & Welling, 2014), trained with Adam (learning rate 1e-3, batches of 128) for 40 epochs.
Beyond the template: encoder and decoder with two hidden layers of 500 ReLU units instead of one;
training images binarized afresh every epoch (dynamic binarization) instead of once; the KL term's
weight warmed up from 0 to 1 over the first 5 epochs; and the learning rate decayed to 0 along a
half cosine. ``--template`` trains the template's model the template's way (one hidden layer, the
fixed binarization, no warm-up, a constant learning rate).

Beyond the assignment (defaults off): ``--posterior planar`` or ``iaf`` turns q(z|x) into a normalizing
flow of ``--flow_steps`` steps on top of the Gaussian (Rezende & Mohamed, 2015; Kingma et al., 2016),
and ``--iw_samples k`` trains on the importance-weighted bound of Burda et al. (2016) instead of the
ELBO.

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
POSTERIORS = ("gaussian", "planar", "iaf")
IAF_HIDDEN_DIM = 320  # width of each IAF step's masked hidden layer and of the encoder's context h
# Kingma et al. (2016) start the gates' pre-activations s near +1 or +2, so that sigmoid(s) is close
# to 1 and each step at first moves z only a little.
IAF_GATE_BIAS = 2.0


# ---------------------------------------------------------------- model

def mlp(in_dim, hidden_dim, out_dim, hidden_layers):
    layers = []
    for _ in range(hidden_layers):
        layers += [nn.Linear(in_dim, hidden_dim), nn.ReLU()]
        in_dim = hidden_dim
    return nn.Sequential(*layers, nn.Linear(in_dim, out_dim))


class Encoder(nn.Module):
    """q(z|x) = N(z; mean(x), diag(std(x)^2)), with std = exp(log std) so that it is always > 0.

    With a flow posterior this Gaussian is the flow's base q_0(z_0|x), and the same last layer also
    outputs ``context_dim`` numbers per image that parameterise the flow (the amortised u, w, b of the
    planar steps, or IAF's context h)."""

    def __init__(self, hidden_dim=500, z_dim=20, hidden_layers=2, context_dim=0):
        super().__init__()
        self.z_dim = z_dim
        self.net = mlp(IMAGE_DIM, hidden_dim, 2 * z_dim + context_dim, hidden_layers)

    def posterior_parameters(self, input):
        """(mean [B, D], std [B, D], context [B, context_dim]); the context is empty for a Gaussian."""
        out = self.net(input.reshape(-1, IMAGE_DIM))
        mean, log_std, context = out.split([self.z_dim, self.z_dim, out.shape[-1] - 2 * self.z_dim], dim=-1)
        return mean, log_std.exp(), context

    def forward(self, input):
        mean, std, _ = self.posterior_parameters(input)
        return mean, std


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


def constrain_planar_u(u, w):
    """u_hat = u + (m(w^T u) - w^T u) w / ||w||^2 with m(a) = -1 + softplus(a) (Rezende & Mohamed,
    2015, appendix A.1): then w^T u_hat = m(w^T u) > -1, which makes the planar step invertible. At
    w = 0 the step is a translation by u tanh(b), invertible for any u; the clamp only keeps out 0/0.
    Returns u_hat [..., D] and 1 + w^T u_hat [...], the latter not rounded through the dot product:
    it is softplus(w^T u), which can be as small as 1e-20 (or 1 + w^T u where the clamp acts)."""
    wu = (w * u).sum(-1, keepdim=True)
    softplus = F.softplus(wu)
    squared_norm = w.square().sum(-1, keepdim=True)
    u_hat = u + (softplus - 1 - wu) * w / squared_norm.clamp_min(1e-12)
    projected = squared_norm / squared_norm.clamp_min(1e-12)  # 1, except for w within 1e-6 of 0
    return u_hat, (projected * softplus + (1 - projected) * (1 + wu)).squeeze(-1)


class PlanarFlow(nn.Module):
    """K planar steps z_k = z_{k-1} + u_hat tanh(w^T z_{k-1} + b) (Rezende & Mohamed, 2015, eq. 10),
    each with log |det df/dz| = log |1 + u_hat^T psi(z)|, psi(z) = tanh'(w^T z + b) w (eq. 11-12).

    The flow has no weights of its own: every image's u, w, b for every step come from the encoder
    (amortised, as in the paper), as a context of K (2D + 1) numbers."""

    def __init__(self, z_dim, steps):
        super().__init__()
        self.z_dim = z_dim
        self.n_steps = steps
        self.context_dim = steps * (2 * z_dim + 1)

    def forward(self, z, context):
        """z_0 [..., B, D] and the context [B, K (2D + 1)] -> (z_K, sum_k log |det| [..., B])."""
        u, w, b = context.unflatten(-1, (self.n_steps, 2 * self.z_dim + 1)).split(
            [self.z_dim, self.z_dim, 1], dim=-1)
        log_det = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
        for k in range(self.n_steps):
            u_hat, one_plus_wu_hat = constrain_planar_u(u[:, k], w[:, k])
            activation = torch.tanh((z * w[:, k]).sum(-1) + b[:, k, 0])
            # 1 + u_hat^T psi = 1 + tanh'(a) w^T u_hat with tanh' = 1 - tanh^2, written as
            # tanh^2 + tanh' (1 + w^T u_hat): a sum of two terms >= 0, so its log never sees a
            # rounded negative number.
            log_det = log_det + torch.log(activation.square() + (1 - activation.square()) * one_plus_wu_hat)
            z = z + u_hat * activation[..., None]
        return z, log_det


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask [out, in] (MADE, Germain et al.,
    2015): output i sees input j only where mask[i, j] = 1."""

    def __init__(self, in_features, out_features, mask):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask)

    def forward(self, input):
        return F.linear(input, self.weight * self.mask, self.bias)


class IAFStep(nn.Module):
    """One step of inverse autoregressive flow (Kingma et al., 2016): [m, s] = MADE(z, h), with m_i and
    s_i depending on z only through the z_j that come before z_i in ``order``, then the numerically
    stable, LSTM-like update z' = sigma * z + (1 - sigma) * m, sigma = sigmoid(s). Its Jacobian is
    triangular in that order with diagonal sigma, so log |det dz'/dz| = sum_i log sigmoid(s_i)."""

    def __init__(self, z_dim, hidden_dim, order):
        super().__init__()
        # MADE's degrees: input i has degree order[i] in 1..D, hidden unit j a degree in 1..D-1,
        # and a unit sees only units of smaller (hidden: smaller or equal) degree.
        hidden_degree = torch.arange(hidden_dim) % max(1, z_dim - 1) + 1
        to_hidden = (hidden_degree[:, None] >= order[None, :]).float()
        to_output = (order[:, None] > hidden_degree[None, :]).float().repeat(2, 1)  # for m and for s
        self.input = MaskedLinear(z_dim, hidden_dim, to_hidden)
        self.context = nn.Linear(hidden_dim, hidden_dim)  # h carries no z: every unit may see it
        self.output = MaskedLinear(hidden_dim, 2 * z_dim, to_output)
        with torch.no_grad():
            self.output.bias[z_dim:].fill_(IAF_GATE_BIAS)

    def forward(self, z, h):
        """z [..., B, D], h [B, hidden] -> (z' [..., B, D], log |det dz'/dz| [..., B])."""
        m, s = self.output(F.elu(self.input(z) + self.context(h))).chunk(2, dim=-1)
        sigma = torch.sigmoid(s)
        return sigma * z + (1 - sigma) * m, F.logsigmoid(s).sum(-1)


class IAF(nn.Module):
    """K IAF steps, the order of the variables reversed from one step to the next so that every z_i
    can come to depend on every other; the encoder's context h is an input of every step."""

    def __init__(self, z_dim, steps, hidden_dim=IAF_HIDDEN_DIM):
        super().__init__()
        self.context_dim = hidden_dim
        order = torch.arange(1, z_dim + 1)
        self.steps = nn.ModuleList(IAFStep(z_dim, hidden_dim, order if k % 2 == 0 else order.flip(0))
                                   for k in range(steps))

    def forward(self, z, context):
        """z_0 [..., B, D] and h [B, hidden] -> (z_K, sum_k log |det| [..., B])."""
        log_det = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
        for step in self.steps:
            z, step_log_det = step(z, context)
            log_det = log_det + step_log_det
        return z, log_det


FLOWS = {"planar": PlanarFlow, "iaf": IAF}


class VAE(nn.Module):
    """p(z) = N(0, I), the decoder's p(x|z), and the encoder's q(z|x) to train them by the ELBO.

    ``posterior`` = "gaussian" is the assignment's q(z|x); "planar" or "iaf" pushes that Gaussian
    through a flow of ``flow_steps`` steps, z_K = f_K(...f_1(z_0)), whose density is
    log q(z_K|x) = log q_0(z_0|x) - sum_k log |det df_k/dz_{k-1}| (Rezende & Mohamed, 2015, eq. 6)."""

    def __init__(self, hidden_dim=500, z_dim=20, hidden_layers=2, posterior="gaussian", flow_steps=8):
        super().__init__()
        self.z_dim = z_dim
        flow = None if posterior == "gaussian" else FLOWS[posterior](z_dim, flow_steps)
        self.encoder = Encoder(hidden_dim, z_dim, hidden_layers, flow.context_dim if flow else 0)
        self.decoder = Decoder(hidden_dim, z_dim, hidden_layers)
        self.flow = flow

    def loss_terms(self, input):
        """Per image, the assignment's two terms of the negative ELBO: the reconstruction loss
        L_recon = -E_q(z|x)[log p(x|z)], estimated with one reparameterised sample z = mean + std * eps,
        eps ~ N(0, I), so that gradients reach the encoder through z; and the regularisation loss
        L_reg = KL(q(z|x) || p(z)), in closed form for the Gaussian posterior. A flow's q(z_K|x) has
        no closed-form KL: it is estimated from the same sample, as log q(z_K|x) - log p(z_K).
        Returns (L_recon [B], L_reg [B])."""
        x = input.reshape(-1, IMAGE_DIM)
        if self.flow is not None:
            log_px_given_z, log_pz_over_qz = ImportanceWeights(self, x).log_weight_terms(1)
            return -log_px_given_z[0], -log_pz_over_qz[0]
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
        self.mean, self.std, self.context = model.encoder.posterior_parameters(self.x)
        self.generator = generator

    def log_weight_terms(self, k):
        """(log p(x|z), log p(z) - log q(z|x)), each [k, B], for k reparameterised samples z ~ q(z|x)."""
        eps = torch.randn((k, *self.mean.shape), generator=self.generator, device=self.mean.device)
        z = self.mean + self.std * eps
        log_det = 0.0
        if self.model.flow is not None:
            z, log_det = self.model.flow(z, self.context)
        log_px_given_z = -reconstruction_loss(self.model.decoder.logits(z), self.x)
        # log p(z) - log q(z|x), with log q(z_K|x) = log q_0(z_0|x) - sum_k log |det df_k/dz_{k-1}|:
        # (z_0 - mean) / std = eps, and the (2 pi)^(-D/2) factors cancel.
        log_pz_over_qz = (0.5 * (eps.square() - z.square()) + self.std.log()).sum(-1) + log_det
        return log_px_given_z, log_pz_over_qz

    def __call__(self, k):
        log_px_given_z, log_pz_over_qz = self.log_weight_terms(k)
        return log_px_given_z + log_pz_over_qz


def importance_weighted_loss(model, x, n_samples, kl_weight=1.0):
    """Per image, minus the importance-weighted bound of Burda et al. (2016) as a training objective:
    L_k = log (1/k) sum_i w_i, w_i = p(x|z_i) p(z_i) / q(z_i|x), z_i ~ q(z|x) reparameterised, computed
    with logsumexp. L_1 is the ELBO, and E[L_k] rises with k towards log p(x). In the KL warm-up the
    log-weights' log p(z) - log q(z|x) is scaled by beta, as L_reg is in the ELBO. Returns (-L_k [B],
    the negative ELBO [B] estimated from the same k samples with beta = 1)."""
    log_px_given_z, log_pz_over_qz = ImportanceWeights(model, x).log_weight_terms(n_samples)
    bound = (log_px_given_z + kl_weight * log_pz_over_qz).logsumexp(0) - math.log(n_samples)
    return -bound, -(log_px_given_z + log_pz_over_qz).mean(0)


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

def epoch_iter(model, data, optimizer, kl_weight=(1.0, 1.0), iw_samples=1):
    """One pass over ``data``; returns the average negative ELBO per image (nats).

    In training mode every batch takes an optimizer step on L_recon + beta * L_reg, with beta rising
    linearly from kl_weight[0] to kl_weight[1] over the epoch (the KL warm-up: the encoder first learns
    to code images before the prior pulls its codes together); with iw_samples = k > 1, on minus the
    importance-weighted bound L_k instead. The value returned is always the true negative ELBO,
    beta = 1. In evaluation mode no gradients are computed.
    """
    device = next(model.parameters()).device
    betas = torch.linspace(*kl_weight, len(data) + 1)[1:].tolist()
    total = torch.zeros((), device=device)
    n_images = 0
    with contextlib.nullcontext() if model.training else torch.inference_mode():
        for step, (beta, batch) in enumerate(zip(betas, tqdm(data, leave=False, disable=None), strict=True)):
            x = batch.to(device).reshape(-1, IMAGE_DIM)
            if model.training and iw_samples > 1:
                loss, negative_elbo = importance_weighted_loss(model, x, iw_samples, beta)
            else:
                reconstruction, regularisation = model.loss_terms(x)
                loss, negative_elbo = reconstruction + beta * regularisation, reconstruction + regularisation
            if model.training:
                loss = loss.mean()
                common.check_finite(loss, f"training batch {step}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            total += negative_elbo.detach().sum()
            n_images += len(x)
    return total.item() / n_images


def run_epoch(model, data, optimizer, kl_weight=(1.0, 1.0), iw_samples=1):
    """Train one epoch on data[0], then evaluate on data[1]. Returns (train, val) negative ELBO."""
    traindata, valdata = data
    model.train()
    with common.training_precision():
        train_elbo = epoch_iter(model, traindata, optimizer, kl_weight, iw_samples)
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
    args = saved["args"]
    setting = TEMPLATE if args["template"] else OURS
    # Checkpoints written before the flow posteriors existed hold Gaussian VAEs.
    model = VAE(HIDDEN_DIM, args["zdim"], setting["hidden_layers"], args.get("posterior", "gaussian"),
                args.get("flow_steps", 8)).to(device)
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
    parser.add_argument("--posterior", choices=POSTERIORS, default="gaussian",
                        help="q(z|x): the assignment's diagonal Gaussian (default), or that Gaussian "
                             "pushed through planar flows or inverse autoregressive flow (IAF)")
    parser.add_argument("--flow_steps", type=common.positive_int, default=8,
                        help="K, steps of a planar or IAF posterior (default 8)")
    parser.add_argument("--iw_samples", type=common.positive_int, default=1,
                        help="k, samples of z per image in the importance-weighted training bound "
                             "(default 1: the ELBO)")
    return common.add_run_args(parser, out="results/vae").parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run = common.Run(args)
    setting = TEMPLATE if args.template else OURS
    splits = bmnist(run.data_root, BATCH_SIZE, dynamic=setting["dynamic_binarization"], log=run.log)
    train_data, val_data, test_data = splits
    model = VAE(HIDDEN_DIM, args.zdim, setting["hidden_layers"], args.posterior,
                args.flow_steps).to(run.device)
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
                                             kl_weights(epoch, setting["warmup_epochs"]), args.iw_samples)
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
               data=splits.source, **evaluate(model, val_data, test_data, args, run))


if __name__ == "__main__":
    common.cli(main)
