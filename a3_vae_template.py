"""Part 1: a variational auto-encoder on binarized MNIST (assignment questions 1.4 and 1.12-1.15).

    python a3_vae_template.py                                  # z = 20, into results/vae/
    python a3_vae_template.py --zdim 2 --out results/vae_z2    # z = 2, adds the learned manifold
    python a3_vae_template.py --template                       # the course template's training

Bernoulli decoder, Gaussian encoder, closed-form KL and a one-sample reparameterised reconstruction
term (Kingma & Welling, 2014), trained with Adam. Every training choice is a field of ``Settings``;
``--set name=value`` changes one. Outputs in --out (PNG + PDF): the negative ELBO per epoch, samples
and their means before training, halfway and at the end, for z = 2 the learned manifold; and
``metrics.json`` with the validation and test negative ELBO and importance-sampled NLL, the naive
Monte-Carlo study of question 1.4 and the sample measures of ``evaluation``.
"""

import contextlib
import math
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import norm
from tqdm import tqdm

import evaluation
import harness
from datasets.bmnist import bmnist

N_PIXELS = 28 * 28
NAIVE_MC_SAMPLE_COUNTS = (10, 100, 1_000, 10_000)
NAIVE_MC_IMAGES = 5
NAIVE_MC_REPEATS = 10
EVALUATION_SAMPLES = 10_000
ROWS_PER_DECODER_CALL = 8192  # bounds memory when K samples of z are decoded for a batch of images


@dataclass(frozen=True)
class Settings:
    epochs: int = 40  # training epochs (the template's --epochs)
    z_dim: int = 20  # dimension of z (the template's --zdim)
    hidden_dim: int = 500  # units of each hidden layer (the template's)
    hidden_layers: int = 2  # hidden ReLU layers of the encoder and of the decoder (template: 1)
    batch_size: int = 128  # images per step (the template's bmnist default)
    lr: float = 1e-3  # Adam's step size (the template's: Adam's default)
    # Training pixels redrawn from the grey levels every epoch, a regulariser (template: one fixed draw).
    dynamic_binarization: bool = True
    # The KL term's weight beta rises from 0 to 1 over these epochs, so that the encoder learns to code
    # images before the prior pulls the codes together (Bowman et al., 2016) (template: 0, beta = 1).
    kl_warmup_epochs: float = 5
    # The lr decays to 0 along a half cosine, one value per epoch (Loshchilov & Hutter, 2017, without
    # restarts) (template: constant).
    cosine_decay: bool = True
    # K, samples of z per image of the importance-sampled NLL on validation data, where settings are
    # chosen (the assignment: K >= 500), and on the test set, whose reported estimate, an upper bound on
    # the NLL that falls as K grows, is the tighter for a larger K
    importance_samples: int = 500
    test_importance_samples: int = 5000

    def __post_init__(self):
        harness.settings.positive(self, "epochs", "z_dim", "hidden_dim", "batch_size",
                                  "importance_samples", "test_importance_samples")


DEFAULT = Settings()
TEMPLATE = Settings(hidden_layers=1, dynamic_binarization=False, kl_warmup_epochs=0, cosine_decay=False)
TEMPLATE_FLAGS = {"epochs": "epochs", "zdim": "z_dim", "importance_samples": "importance_samples"}


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
        self.net = mlp(N_PIXELS, hidden_dim, 2 * z_dim, hidden_layers)

    def forward(self, input):
        mean, log_std = self.net(input.reshape(-1, N_PIXELS)).chunk(2, dim=-1)
        return mean, log_std.exp()


class Decoder(nn.Module):
    """p(x|z) = prod over pixels of Bernoulli(x_m; sigmoid(logits(z))_m)."""

    def __init__(self, hidden_dim=500, z_dim=20, hidden_layers=2):
        super().__init__()
        self.net = mlp(z_dim, hidden_dim, N_PIXELS, hidden_layers)

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

    @classmethod
    def from_settings(cls, settings):
        return cls(settings.hidden_dim, settings.z_dim, settings.hidden_layers)

    # The seam for extensions (extensions/vae_flows.py subclasses VAE): every z the VAE uses is drawn
    # by ``posterior``, so a richer q(z|x) overrides that method alone; a training step minimises what
    # ``loss`` returns, so another training bound overrides that one.
    def posterior(self, x, n_samples=1, generator=None):
        """q(z|x) of images x [B, 784]: n_samples reparameterised draws z [n, B, D], log q(z|x) - log p(z)
        at each [n, B] (importance sampling's weights), and KL(q(z|x) || p(z)) [B], here in closed form."""
        mean, std = self.encoder(x)
        z, log_q_over_p = reparameterise(mean, std, n_samples, generator)
        return z, log_q_over_p, kl_to_standard_normal(mean, std)

    def loss_terms(self, input):
        """Per image, the assignment's two terms of the negative ELBO: L_recon = -E_q(z|x)[log p(x|z)]
        from one reparameterised sample of z, and L_reg = KL(q(z|x) || p(z)). Returns ([B], [B])."""
        x = input.reshape(-1, N_PIXELS)
        z, _, kl = self.posterior(x)
        return reconstruction_loss(self.decoder.logits(z[0]), x), kl

    def loss(self, input, kl_weight=1.0):
        """Per image, what a training step minimises, L_recon + beta L_reg (beta < 1 in the KL warm-up),
        and the negative ELBO, L_recon + L_reg. Returns ([B], [B])."""
        reconstruction, regularisation = self.loss_terms(input)
        return reconstruction + kl_weight * regularisation, reconstruction + regularisation

    def forward(self, input):
        """The batch's average negative ELBO, since ELBO = E_q(z|x)[log p(x|z)] - KL(q(z|x) || p(z))."""
        return self.loss(input)[1].mean()

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

def reparameterise(mean, std, n_samples, generator=None):
    """n_samples draws z = mean + std * eps, eps ~ N(0, I), of q = N(mean, diag std^2) [B, D], through
    which gradients reach mean and std (Kingma & Welling, 2014, section 2.4), and log q(z) - log p(z)
    at each for p = N(0, I): with (z - mean) / std = eps the (2 pi)^(-D/2) factors cancel.
    Returns ([n, B, D], [n, B])."""
    eps = torch.randn((n_samples, *mean.shape), generator=generator, dtype=mean.dtype, device=mean.device)
    z = mean + std * eps
    return z, (0.5 * (z.square() - eps.square()) - std.log()).sum(-1)


def reconstruction_loss(logits, x):
    """-log p(x|z) = -sum_m [x_m log sigma(l_m) + (1 - x_m) log(1 - sigma(l_m))], summed over the 784
    pixels, from the logits l (binary cross-entropy with logits works in log-sigmoid space)."""
    logits, x = torch.broadcast_tensors(logits, x)
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


def kl_to_standard_normal(mean, std):
    """KL(N(mean, diag std^2) || N(0, I)) = sum_d [(std_d^2 + mean_d^2 - 1) / 2 - log std_d]
    (Kingma & Welling, 2014, appendix B)."""
    return (0.5 * (std.square() + mean.square() - 1) - std.log()).sum(-1)


def log_mean_exp(draw_log_weights, n_samples, batch):
    """log (1/K) sum_k exp(w_k), and the mean of the w_k, for each of ``batch`` images, with K =
    n_samples log-weights drawn in chunks by ``draw_log_weights(k) -> [k, batch]`` so that no more
    than ROWS_PER_DECODER_CALL images are decoded at once. logsumexp keeps tiny likelihoods from
    underflowing."""
    log_weights, drawn = [], 0
    while drawn < n_samples:
        k = min(n_samples - drawn, max(1, ROWS_PER_DECODER_CALL // batch))
        log_weights.append(draw_log_weights(k))
        drawn += k
    log_weights = torch.cat(log_weights)
    return log_weights.logsumexp(0) - math.log(n_samples), log_weights.mean(0)


def importance_log_weights(model, x, n_samples, generator=None):
    """log w = log p(x|z) + log p(z) - log q(z|x) [n, B] for z ~ q(z|x): (1/K) sum_k w_k estimates p(x)
    without bias, so its log is a lower bound on log p(x) that tightens as K grows (Burda et al., 2016)."""
    z, log_q_over_p, _ = model.posterior(x, n_samples, generator)
    return -reconstruction_loss(model.decoder.logits(z), x) - log_q_over_p


def prior_log_weights(model, x, n_samples, generator=None):
    """log w = log p(x|z) [n, B] for z ~ p(z), one set of z for every image: the naive Monte-Carlo
    estimate of question 1.4, log p(x) ~ log (1/S) sum_s p(x|z_s)."""
    z = torch.randn(n_samples, 1, model.z_dim, generator=generator, device=x.device)
    return -reconstruction_loss(model.decoder.logits(z), x)


@torch.inference_mode()
def importance_bounds(model, data, n_samples, generator=None):
    """(negative ELBO, negative log-likelihood), nats averaged over the images of ``data``, both from
    K = n_samples importance samples per image: -log (1/K) sum_k w_k estimates -log p(x), and the mean
    of the same log-weights estimates the ELBO with K times less variance than one sample."""
    device = next(model.parameters()).device
    negative_elbo, negative_log_likelihood, n_images = 0.0, 0.0, 0
    for x in tqdm(data, desc="importance sampling", leave=False, disable=None):
        x = x.to(device).reshape(-1, N_PIXELS)
        draw = lambda k, x=x: importance_log_weights(model, x, k, generator)
        log_likelihood, elbo = log_mean_exp(draw, n_samples, len(x))
        negative_elbo -= elbo.sum()
        negative_log_likelihood -= log_likelihood.sum()
        n_images += len(x)
    return negative_elbo.item() / n_images, negative_log_likelihood.item() / n_images


@torch.inference_mode()
def naive_mc_study(model, images, sample_counts, repeats, generator=None):
    """Question 1.4: log p(x) of a few images, estimated ``repeats`` times from S samples of the prior
    (naive) and from S samples of q(z|x) (importance sampling), for each S. The naive estimate needs a
    z_s that explains x, which the prior rarely proposes: it stays below log p(x), with a large spread."""
    x = images.reshape(-1, N_PIXELS)
    rows = []
    for n_samples in sample_counts:
        estimates = {}
        for name, log_weights in (("naive", prior_log_weights), ("importance", importance_log_weights)):
            draw = lambda k, log_weights=log_weights: log_weights(model, x, k, generator)
            estimates[name] = torch.stack([log_mean_exp(draw, n_samples, len(x))[0] for _ in range(repeats)])
        rows.append({"samples": n_samples, "naive_mean": estimates["naive"].mean(0).tolist(),
                     "naive_std": estimates["naive"].std(0).tolist(),
                     "importance_mean": estimates["importance"].mean(0).tolist(),
                     "importance_std": estimates["importance"].std(0).tolist()})
    return {"images": len(x), "repeats": repeats, "unit": "log-likelihood, nats", "rows": rows}


# ---------------------------------------------------------------- epoch loop

def get_lr(step, steps_per_epoch, settings):
    """Adam's step size at training step ``step`` (counted from 0): settings.lr, or with cosine_decay
    settings.lr (1 + cos(pi e / epochs)) / 2 in epoch e (counted from 0)."""
    if not settings.cosine_decay:
        return settings.lr
    return settings.lr * 0.5 * (1 + math.cos(math.pi * (step // steps_per_epoch) / settings.epochs))


def kl_weight(step, steps_per_epoch, settings):
    """beta at training step ``step`` (counted from 0), rising linearly from 0 to 1 over the first
    kl_warmup_epochs, then 1: batch b of epoch e (from 0) takes the (b + 1)-th of steps_per_epoch + 1
    evenly spaced float32 points (torch.linspace) from min(1, e / warm-up) to min(1, (e + 1) / warm-up)."""
    if settings.kl_warmup_epochs == 0:
        return 1.0
    epoch, batch = divmod(step, steps_per_epoch)
    start, end = (min(1.0, e / settings.kl_warmup_epochs) for e in (epoch, epoch + 1))
    return torch.linspace(start, end, steps_per_epoch + 1)[batch + 1].item()


def epoch_iter(model, data, optimizer, settings=DEFAULT, first_step=0):
    """One pass over ``data``; returns the average negative ELBO per image (nats).

    In training mode batch b is training step first_step + b: it sets the lr (``get_lr``) and takes an
    optimizer step on ``model.loss`` with the KL weight ``kl_weight``. The value returned is always the
    true negative ELBO, beta = 1. In evaluation mode no gradients are computed."""
    device = next(model.parameters()).device
    total, n_images = torch.zeros((), device=device), 0
    with contextlib.nullcontext() if model.training else torch.inference_mode():
        for step, batch in enumerate(tqdm(data, leave=False, disable=None), start=first_step):
            x = batch.to(device).reshape(-1, N_PIXELS)
            if not model.training:
                _, negative_elbo = model.loss(x)
            else:
                for group in optimizer.param_groups:
                    group["lr"] = get_lr(step, len(data), settings)
                loss, negative_elbo = model.loss(x, kl_weight(step, len(data), settings))
                loss = loss.mean()
                harness.check_finite(loss, f"training step {step}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            total += negative_elbo.detach().sum()
            n_images += len(x)
    return total.item() / n_images


def run_epoch(model, data, optimizer, settings=DEFAULT, first_step=0, precision="fp32"):
    """Train one epoch on data[0] (its steps counted from first_step), with the matmuls in
    ``precision``, then evaluate on data[1] in fp32. Returns (train, val) negative ELBO."""
    traindata, valdata = data
    model.train()
    with harness.matmul_precision(precision):
        train_elbo = epoch_iter(model, traindata, optimizer, settings, first_step)
    model.eval()
    val_elbo = epoch_iter(model, valdata, optimizer)
    return train_elbo, val_elbo


def train(model, data, settings, run):
    """Adam for settings.epochs epochs on data = (train, val), resumable; the untrained model is epoch
    0. Returns the sample grids {epoch: (sampled_ims, im_means)} at the start, halfway and the end."""
    train_data, val_data = data
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, fused=True)
    samples = run.restore(model=model, optimizer=optimizer).get("samples", {})
    if run.is_new:
        model.eval()
        run.record(train_negative_elbo=epoch_iter(model, train_data, None),
                   val_negative_elbo=epoch_iter(model, val_data, None))
        samples[0] = grid_samples(model, run.seed)
        run.save({"samples": samples}, model=model, optimizer=optimizer)
    for epoch in run.epochs(settings.epochs):
        with run.timed(len(train_data.dataset)):
            train_elbo, val_elbo = run_epoch(model, data, optimizer, settings, (epoch - 1) * len(train_data),
                                             run.precision)
        run.record(train_negative_elbo=train_elbo, val_negative_elbo=val_elbo)
        if epoch in (settings.epochs // 2, settings.epochs):
            samples[epoch] = grid_samples(model, run.seed)
        run.save({"samples": samples}, model=model, optimizer=optimizer)
    return samples


# ---------------------------------------------------------------- figures

def save_elbo_plot(train_curve, val_curve, filename):
    """Negative ELBO per epoch from epoch 0 (the untrained model), and a second figure from epoch 1 on,
    since the untrained model's value flattens everything after it."""
    curves = {"train": train_curve, "validation": val_curve}
    harness.save_curves(curves, filename, ylabel="negative ELBO (nats)")
    harness.save_curves({label: values[1:] for label, values in curves.items()}, f"{filename}_zoom",
                        ylabel="negative ELBO (nats)", start=1)


@torch.no_grad()
def grid_samples(model, seed):
    """100 Bernoulli samples and their means, from the same noise at every epoch."""
    model.eval()
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    sampled_ims, im_means = model.sample(100, generator=generator)
    return sampled_ims.cpu().to(torch.uint8), im_means.cpu()


@torch.inference_mode()
def save_manifold(model, stem, steps=20):
    """Question 1.15: decoder means over a steps x steps grid of z. The grid is norm.ppf of the
    probabilities (i + 1/2) / steps, the midpoints of equal-mass slices of N(0, 1): every cell stands
    for the same share of the prior's mass."""
    values = norm.ppf((np.arange(steps) + 0.5) / steps)
    z1, z2 = np.meshgrid(values, values[::-1])  # z2 grows upwards, as on a plot's y axis
    z = torch.tensor(np.stack([z1.ravel(), z2.ravel()], axis=1), dtype=torch.float32,
                     device=next(model.parameters()).device)
    grid = harness.image_grid(model.decoder(z).cpu().reshape(-1, 1, 28, 28), nrow=steps, padding=0)
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
    harness.save_figure(fig, stem)


def save_figures(model, samples, settings, run):
    """Every figure of the run into run.out; returns {role: file stem} for metrics.json."""
    curves = run.curves
    save_elbo_plot(curves["train_negative_elbo"], curves["val_negative_elbo"], run.out / "negative_elbo")
    figures = {"elbo": "negative_elbo", "elbo_zoom": "negative_elbo_zoom",
               "memorisation": "memorisation"}  # the last drawn by evaluation.evaluate_samples
    for epoch, (sampled_ims, im_means) in samples.items():
        harness.save_image_grid(sampled_ims, run.out / f"samples_epoch{epoch:03d}", nrow=10)
        harness.save_image_grid(im_means, run.out / f"means_epoch{epoch:03d}", nrow=10)
    for role, epoch in (("start", 0), ("halfway", settings.epochs // 2), ("end", settings.epochs)):
        figures |= {f"{kind}_{role}": f"{kind}_epoch{epoch:03d}" for kind in ("samples", "means")}
    if settings.z_dim == 2:
        save_manifold(model, run.out / "manifold")
        figures["manifold"] = "manifold"
    return figures


# ---------------------------------------------------------------- evaluation of the trained model

def evaluate(model, splits, settings, run):
    """The validation and test negative ELBO and importance-sampled negative log-likelihood (settings
    are chosen by the validation numbers), the naive Monte-Carlo study of question 1.4 and the sample
    measures of ``evaluation`` of the decoder means and of binary samples drawn from them, all from
    seeded noise. Rebuilt from weights, the importance-sampled bounds (minutes of CPU) keep the run's
    values."""
    model.eval()
    _, val_data, test_data = splits
    results = {"data": splits.source}
    if not run.from_weights:
        noise = torch.Generator(run.device).manual_seed(run.seed)
        for split, data, k in (("validation", val_data, settings.importance_samples),
                               ("test", test_data, settings.test_importance_samples)):
            negative_elbo, nll = importance_bounds(model, data, k, noise)
            results[split] = {"negative_elbo": negative_elbo, "nll_importance": nll, "importance_samples": k}
            run.log(f"{split}: negative ELBO {negative_elbo:.2f}, negative log-likelihood {nll:.2f} nats "
                    f"(importance sampling, K = {k})")
    first_images = next(iter(test_data))[:NAIVE_MC_IMAGES].to(run.device)
    results["naive_mc"] = naive_mc_study(model, first_images, NAIVE_MC_SAMPLE_COUNTS, NAIVE_MC_REPEATS,
                                         torch.Generator(run.device).manual_seed(run.seed + 1))
    sample_noise = torch.Generator(run.device).manual_seed(run.seed + 2)
    sampled_ims, im_means = model.sample(EVALUATION_SAMPLES, generator=sample_noise)
    results["evaluation"] = evaluation.evaluate_samples(im_means.cpu(), root=run.data_root, device=run.device,
                                                        out=run.out)
    results["evaluation_binary"] = evaluation.evaluate_samples(sampled_ims.cpu(), root=run.data_root,
                                                               device=run.device, check_memorisation=False)
    return results


def load_sampler(checkpoint_path, device="cpu", settings_class=Settings, build=VAE.from_settings):
    """sample(n) -> [n, 784] decoder means on the CPU, in [0, 1], from the model in ``checkpoint_path``
    (an extension's checkpoint: pass its settings class and model builder)."""
    saved = harness.load_checkpoint(checkpoint_path, device)
    model = build(settings_class(**saved["settings"])).to(device)
    model.load_state_dict(saved["state"]["model"])
    model.eval()
    return lambda n: model.sample(n)[1].cpu()


# ---------------------------------------------------------------- main

def parse_args(argv=None, doc=__doc__, out="results/vae"):
    return harness.parse_args(argv, doc, out, DEFAULT, TEMPLATE_FLAGS)


def main(argv=None, defaults=(DEFAULT, TEMPLATE), build=VAE.from_settings, doc=__doc__, out="results/vae"):
    """Train (or rebuild from weights), draw the figures, evaluate. An extension passes its own
    settings ``defaults`` (DEFAULT, TEMPLATE), model ``build``er, ``doc`` and ``out``."""
    args = parse_args(argv, doc, out)
    settings = harness.settings.resolve(args, *defaults)
    run = harness.Run(args, settings)
    splits = bmnist(run.data_root, settings.batch_size, dynamic=settings.dynamic_binarization, log=run.log)
    model = build(settings).to(run.device)
    if args.from_weights:
        samples = run.load_weights(model=model)["samples"]
    else:
        samples = train(model, splits[:2], settings, run)
    figures = save_figures(model, samples, settings, run)
    results = evaluate(model, splits, settings, run)
    milestones = {"halfway": settings.epochs // 2, "kl_warmup_end": math.ceil(settings.kl_warmup_epochs) + 1}
    run.finish(model, results, weights={"model": model, "samples": samples}, milestones=milestones,
               figures=figures)


if __name__ == "__main__":
    harness.cli(main)
