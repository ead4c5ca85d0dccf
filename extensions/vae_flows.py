"""Beyond the assignment (question 1.8): richer posteriors for the VAE, and a tighter training bound.

    python -m extensions.vae_flows                       # IAF, K = 4: results/extensions/vae_iaf_k4/
    python -m extensions.vae_flows --set posterior=planar --set flow_steps=8 --out <folder>
    python -m extensions.vae_flows --set posterior=gaussian --set iw_samples=5 --out <folder>

The gap between the negative ELBO and -log p(x) is KL(q(z|x) || p(z|x)), which a diagonal Gaussian
q(z|x) cannot close. Here q(z|x) is that Gaussian pushed through a normalizing flow of ``flow_steps``
steps, planar (Rezende & Mohamed, 2015) or inverse autoregressive (IAF, Kingma et al., 2016), and
``iw_samples`` = k > 1 trains on the importance-weighted bound of Burda et al. (2016) instead of the
ELBO, its gradient estimated as theirs or, ``iw_estimator`` = "dreg", doubly reparameterised (Tucker
et al., 2019). Everything else is a3_vae_template.py's: its model classes (subclassed through
``VAE.posterior`` and ``VAE.loss``), epoch loop, figures, evaluation and ``main``; ``Settings`` adds
this module's fields to the answer's. The outputs are the answer's, in --out.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import a3_vae_template as vae
import harness

POSTERIORS = ("gaussian", "planar", "iaf")
IW_ESTIMATORS = ("iwae", "dreg")


@dataclass(frozen=True)
class Settings(vae.Settings):
    epochs: int = 80  # every run of this module's comparison trains this long (the answer: 40)
    posterior: str = "iaf"  # q(z|x): the answer's "gaussian", or it pushed through "planar" or "iaf" steps
    flow_steps: int = 4  # K, steps of the planar or IAF flow
    iw_samples: int = 1  # k, samples of z per image of the training bound L_k (1: the ELBO)
    iaf_hidden_dim: int = 320  # units of each IAF step's masked hidden layer and of the context h
    iaf_gate_bias: float = 2.0  # initial bias of IAF's gates s: sigmoid(s) near 1, so each step first
    # moves z only a little (Kingma et al., 2016, suggest +1 or +2)
    # The gradient estimator of the training bound L_k: "iwae", the reparameterised gradient of L_k
    # (Burda et al., 2016), or "dreg", the doubly reparameterised one (Tucker et al., 2019): the same
    # decoder gradient, and an encoder gradient without the score-function term whose signal-to-noise
    # ratio falls as k grows (Rainforth et al., 2018); with k = 1, the ELBO's path-derivative gradient
    # (Roeder et al., 2017). "dreg" needs the Gaussian posterior.
    iw_estimator: str = "iwae"

    def __post_init__(self):
        super().__post_init__()
        harness.settings.positive(self, "flow_steps", "iw_samples", "iaf_hidden_dim")
        harness.settings.one_of(self, "posterior", POSTERIORS)
        harness.settings.one_of(self, "iw_estimator", IW_ESTIMATORS)
        if self.iw_estimator == "dreg" and self.posterior != "gaussian":
            raise harness.settings.SettingsError(
                f"--set iw_estimator=dreg: DReG needs posterior=gaussian, not {self.posterior}: the density "
                "of a flow posterior at z_K with its parameters detached needs the flow's inverse")


DEFAULT = Settings()
# The course template's training with this module's posterior and bound.
TEMPLATE = Settings(**{field.name: getattr(vae.TEMPLATE, field.name) for field in fields(vae.TEMPLATE)})


# ---------------------------------------------------------------- planar flow

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


# ---------------------------------------------------------------- inverse autoregressive flow

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
    stable, LSTM-like update z' = sigma * z + (1 - sigma) * m, sigma = sigmoid(s) (their eq. 14 and
    algorithm 1). Its Jacobian is triangular in that order with diagonal sigma, so
    log |det dz'/dz| = sum_i log sigmoid(s_i)."""

    def __init__(self, z_dim, hidden_dim, order, gate_bias):
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
            self.output.bias[z_dim:].fill_(gate_bias)

    def forward(self, z, h):
        """z [..., B, D], h [B, hidden] -> (z' [..., B, D], log |det dz'/dz| [..., B])."""
        m, s = self.output(F.elu(self.input(z) + self.context(h))).chunk(2, dim=-1)
        sigma = torch.sigmoid(s)
        return sigma * z + (1 - sigma) * m, F.logsigmoid(s).sum(-1)


class IAF(nn.Module):
    """K IAF steps, the order of the variables reversed from one step to the next so that every z_i
    can come to depend on every other; the encoder's context h is an input of every step."""

    def __init__(self, z_dim, steps, hidden_dim=320, gate_bias=2.0):
        super().__init__()
        self.context_dim = hidden_dim
        order = torch.arange(1, z_dim + 1)
        orders = [order if k % 2 == 0 else order.flip(0) for k in range(steps)]
        self.steps = nn.ModuleList(IAFStep(z_dim, hidden_dim, order, gate_bias) for order in orders)

    def forward(self, z, context):
        """z_0 [..., B, D] and h [B, hidden] -> (z_K, sum_k log |det| [..., B])."""
        log_det = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
        for step in self.steps:
            z, step_log_det = step(z, context)
            log_det = log_det + step_log_det
        return z, log_det


# ---------------------------------------------------------------- the VAE with a flow posterior

class FlowVAE(vae.VAE):
    """The answer's VAE with q(z|x) = the encoder's Gaussian q_0(z_0|x) pushed through a flow,
    z_K = f_K(...f_1(z_0)), whose density is log q(z_K|x) = log q_0(z_0|x) - sum_k log |det df_k/dz_{k-1}|
    (Rezende & Mohamed, 2015, eq. 7); and, with iw_samples = k > 1, trained on the importance-weighted
    bound, its gradient estimated by ``iw_estimator``. ``posterior`` = "gaussian" with k = 1 and the
    "iwae" estimator is the answer's VAE."""

    def __init__(self, hidden_dim=500, z_dim=20, hidden_layers=2, posterior="iaf", flow_steps=4,
                 iw_samples=1, iaf_hidden_dim=320, iaf_gate_bias=2.0, iw_estimator="iwae"):
        super().__init__(hidden_dim, z_dim, hidden_layers)
        self.iw_samples = iw_samples
        self.iw_estimator = iw_estimator
        self.flow = {"gaussian": lambda: None, "planar": lambda: PlanarFlow(z_dim, flow_steps),
                     "iaf": lambda: IAF(z_dim, flow_steps, iaf_hidden_dim, iaf_gate_bias)}[posterior]()
        # The flow's context (planar: each image's u, w, b; IAF: h) from the encoder's last hidden layer,
        # beside its mean and log std.
        self.context = None if self.flow is None else nn.Linear(hidden_dim, self.flow.context_dim)

    @classmethod
    def from_settings(cls, settings):
        return cls(settings.hidden_dim, settings.z_dim, settings.hidden_layers, settings.posterior,
                   settings.flow_steps, settings.iw_samples, settings.iaf_hidden_dim, settings.iaf_gate_bias,
                   settings.iw_estimator)

    def posterior(self, x, n_samples=1, generator=None):
        """As the answer's: z_K [n, B, D], log q(z_K|x) - log p(z_K) [n, B], and KL(q(z|x) || p(z)) [B],
        which for a flow has no closed form: its estimate from the n samples."""
        if self.flow is None:
            return super().posterior(x, n_samples, generator)
        hidden = self.encoder.net[:-1](x)  # the answer's Encoder.forward, keeping its last hidden layer
        mean, log_std = self.encoder.net[-1](hidden).chunk(2, dim=-1)
        z_0, log_q0_over_p = vae.reparameterise(mean, log_std.exp(), n_samples, generator)
        z, log_det = self.flow(z_0, self.context(hidden))
        # log q(z_K|x) - log p(z_K) = [log q_0(z_0|x) - log p(z_0)] + log p(z_0) - log p(z_K) - log det,
        # with log p(z_0) - log p(z_K) = (z_K^2 - z_0^2) / 2 summed, as a product to avoid cancellation.
        log_q_over_p = log_q0_over_p + 0.5 * ((z - z_0) * (z + z_0)).sum(-1) - log_det
        return z, log_q_over_p, log_q_over_p.mean(0)

    def loss(self, input, kl_weight=1.0):
        """In training with iw_samples = k > 1 or the "dreg" estimator, minus the importance-weighted
        bound L_k with the gradient of ``iw_estimator``; otherwise the answer's loss (with the
        closed-form KL where q(z|x) is the Gaussian)."""
        if not self.training or (self.iw_samples == 1 and self.iw_estimator == "iwae"):
            return super().loss(input, kl_weight)
        return importance_weighted_loss(self, input.reshape(-1, vae.N_PIXELS), self.iw_samples, kl_weight,
                                        self.iw_estimator)


def importance_weighted_loss(model, x, n_samples, kl_weight=1.0, estimator="iwae"):
    """Per image, minus the importance-weighted bound L_k = log (1/k) sum_i w_i with
    w_i = p(x|z_i) p(z_i) / q(z_i|x), z_i ~ q(z|x) reparameterised (Burda et al., 2016, eq. 8), computed
    with logsumexp; log p(z_i) - log q(z_i|x) is scaled by the KL warm-up's beta, as L_reg is in the ELBO.
    L_1 is the ELBO, and E[L_k] rises with k towards log p(x). Returns (-L_k [B], the negative ELBO [B]
    estimated from the same k samples with beta = 1). ``estimator`` = "dreg": the same values, with
    the gradients of ``doubly_reparameterised_loss``."""
    if estimator == "dreg":
        return doubly_reparameterised_loss(model, x, n_samples, kl_weight)
    z, log_q_over_p, _ = model.posterior(x, n_samples)
    log_px_given_z = -vae.reconstruction_loss(model.decoder.logits(z), x)
    bound = (log_px_given_z - kl_weight * log_q_over_p).logsumexp(0) - math.log(n_samples)
    return -bound, (log_q_over_p - log_px_given_z).mean(0)


def doubly_reparameterised_loss(model, x, n_samples, kl_weight=1.0):
    """``importance_weighted_loss``'s values, from the same draws, with the gradients of the doubly
    reparameterised estimator (DReG, Tucker et al., 2019), for the Gaussian q(z|x). With normalised
    weights w~_i = w_i / sum_j w_j, the decoder's gradient is the usual sum_i w~_i d log w_i / d theta,
    and the encoder's

        sum_i ((1 - beta) w~_i + beta w~_i^2) (d log w_i / d z_i) (d z_i / d phi),

    where d log w_i / d z_i holds q's parameters fixed (the stop-gradient in log q(z_i|x)): the
    score-function term of the IWAE gradient, E[sum_i w~_i d log q(z_i|x) / d phi] times beta,
    rewritten by reparameterisation as a path derivative (their eq. 5-7); beta = 1 gives their w~_i^2.
    It is built as a surrogate: the gradient of logsumexp_i log w_i with q's parameters detached is
    w~_i along each path, and a hook multiplies the gradient reaching z_i by (1 - beta) + beta w~_i.

    A flow posterior is refused: its density at z_K with the parameters detached would need z_0 =
    f^-1(z_K), the flow's inverse."""
    if getattr(model, "flow", None) is not None:
        raise ValueError("the DReG estimator needs the Gaussian posterior: the density of a flow posterior "
                         "at z_K with its parameters detached needs the flow's inverse")
    mean, std = model.encoder(x)  # as the answer's posterior, so the same noise gives the same z
    z, log_q_over_p = vae.reparameterise(mean, std, n_samples)
    # log q(z|x) - log p(z) at the same z with q's mean and std detached: the encoder reaches it only
    # through z = mean + std * eps.
    eps = (z - mean.detach()) / std.detach()
    log_q_over_p_fixed_q = (0.5 * (z.square() - eps.square()) - std.detach().log()).sum(-1)
    log_px_given_z = -vae.reconstruction_loss(model.decoder.logits(z), x)
    log_w = log_px_given_z - kl_weight * log_q_over_p
    bound = log_w.logsumexp(0) - math.log(n_samples)
    surrogate = (log_px_given_z - kl_weight * log_q_over_p_fixed_q).logsumexp(0)
    if z.requires_grad:
        weights = torch.softmax(log_w.detach(), dim=0)
        z.register_hook(lambda grad: grad * ((1 - kl_weight) + kl_weight * weights).unsqueeze(-1))
    # The value is -L_k itself; the gradient is the surrogate's.
    negative_bound = -(bound.detach() + (surrogate - surrogate.detach()))
    return negative_bound, (log_q_over_p - log_px_given_z).mean(0).detach()


def load_sampler(checkpoint_path, device="cpu"):
    """sample(n) -> [n, 784] decoder means, from a checkpoint of this module (the answer's sampler)."""
    return vae.load_sampler(checkpoint_path, device, Settings, FlowVAE.from_settings)


def main(argv=None):
    vae.main(argv, (DEFAULT, TEMPLATE), FlowVAE.from_settings, __doc__, out="results/extensions/vae_iaf_k4")


if __name__ == "__main__":
    harness.cli(main)
