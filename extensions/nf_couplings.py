"""Beyond the assignment (question 3.4): RealNVP's convolutional coupling networks and Flow++'s
variational dequantization, handed to the flow of a3_nf_template.py through its two seams.

    python -m extensions.nf_couplings                      # conv couplings into results/extensions/nf_conv
    python -m extensions.nf_couplings --set dequantization=variational \\
        --out results/extensions/nf_conv_variational       # and Flow++'s learned noise q(u | x)

Everything else is the answer's: its Model, Flow and Coupling (``net=`` a factory of ``ConvNet``,
``dequantization=VariationalDequantization``), epoch loop, figures, evaluation and ``main``.
``--template`` trains these networks the course template's way (the answer's TEMPLATE).
"""

import dataclasses
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

import a3_nf_template as nf
import harness

COUPLINGS = ("mlp", "conv")
DEQUANTIZATIONS = ("uniform", "variational")


@dataclasses.dataclass(frozen=True)
class Settings(nf.Settings):
    coupling: str = "conv"  # each coupling's network: the template's MLP ("mlp") or ConvNet ("conv")
    # "uniform" (the answer's) or "variational": Flow++'s learned q(u | x) (VariationalDequantization)
    dequantization: str = "uniform"
    channels: int = 32  # ConvNet's channels, on the squeezed 14x14 grid
    blocks: int = 2  # ConvNet's residual blocks
    # ConvNets have far fewer parameters than the MLPs: smaller batches at the template's
    # learning rate, more steps per image, warmed up over a quarter of an epoch, for fewer epochs
    batch_size: int = 128
    lr: float = 1e-3
    warmup_epochs: float = 0.25
    epochs: int = 12

    def __post_init__(self):
        super().__post_init__()
        harness.settings.positive(self, "channels", "blocks")
        harness.settings.one_of(self, "coupling", COUPLINGS)
        harness.settings.one_of(self, "dequantization", DEQUANTIZATIONS)


DEFAULT = Settings()
TEMPLATE = Settings(**dataclasses.asdict(nf.TEMPLATE))  # the template's training, these networks


class ConvNet(nn.Module):
    """A coupling network (RealNVP's convolutional choice, Dinh et al., 2017) in place of the
    template's MLP, built for one coupling's ``mask``. Its input is the masked image with the mask
    as an extra channel (and a ``context`` image, in the dequantizer). A squeeze (``pixel_unshuffle``)
    first moves each 2x2 block of the 28x28 grid into 4 channels, so every convolution runs on 14x14,
    at a quarter of the cost, and sees twice as far; then residual blocks h + conv(elu(h)), and an
    output convolution initialised to zero, so that the coupling starts as the identity, unsqueezed
    back to 28x28."""

    def __init__(self, mask, channels=32, blocks=2, context_channels=0):
        super().__init__()
        self.register_buffer("mask", mask.view(1, 1, 28, 28), persistent=False)  # the coupling's own
        self.input = nn.Conv2d(4 * (2 + context_channels), channels, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(blocks))
        self.output = nn.Conv2d(channels, 4 * 2, 3, padding=1)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, masked, context=None):
        """masked z [B, 784] (and context [B, C, 28, 28]) -> [B, 2 * 784]: log-scale, translation."""
        images = [masked.view(-1, 1, 28, 28), self.mask.expand(len(masked), -1, -1, -1)]
        if context is not None:
            images.append(context)
        h = self.input(F.pixel_unshuffle(torch.cat(images, dim=1), 2))
        for conv in self.blocks:
            h = h + conv(F.elu(h))
        return F.pixel_shuffle(self.output(F.elu(h)), 2).flatten(1)


def log_logistic(x):
    """Elementwise log-density of the standard logistic distribution, log sigmoid(x) sigmoid(-x),
    which is also log of sigmoid's derivative at x."""
    return F.logsigmoid(x) + F.logsigmoid(-x)


class VariationalDequantization(nn.Module):
    """Flow++'s learned dequantization noise q(u | x) (Ho et al., 2019, sec. 3.1), a layer of the
    answer's interface: x -> x + u with u = sigmoid(g(e; x)), e ~ Logistic(0, 1) and g two
    conditional checkerboard couplings whose networks (narrower than the flow's: the noise needs far
    less capacity than the image) also see the image x / 255, and the log-determinant less

        log q(u | x) = log Logistic(e) - log |det dg/de| - sum_i log sigmoid'(g_i).

    sigmoid of a logistic draw is uniform, and g starts as the identity, so training starts from the
    uniform dequantization exactly: u ~ U(0, 1)^784 and log q = 0. Reverse: floor, as the uniform one."""

    def __init__(self, n_flows=1):
        super().__init__()
        self.flow = nf.Flow([nf.N_PIXELS], n_flows,
                            net=functools.partial(ConvNet, channels=16, blocks=1, context_channels=1))

    def noise(self, x, generator=None):
        """u [B, 784] in (0, 1) for pixels x [B, 784] in 0..255, and log q(u | x) [B]."""
        uniform = torch.rand(x.shape, dtype=x.dtype, device=x.device, generator=generator).clamp(min=1e-7)
        e = torch.log(uniform) - torch.log1p(-uniform)  # a logistic draw, by inverting its CDF
        g, log_det = self.flow(e, x.new_zeros(len(x)), context=(x / 255).view(-1, 1, 28, 28))
        log_q = (log_logistic(e) - log_logistic(g)).sum(dim=1) - log_det
        return torch.sigmoid(g), log_q

    def forward(self, z, ldj, reverse=False, generator=None):
        if reverse:
            return z.floor().clamp(0, 255), ldj
        u, log_q = self.noise(z, generator)
        return z + u, ldj - log_q


def dequantization_layer(name):
    """The dequantization layer a setting names (one of DEQUANTIZATIONS): the answer's uniform noise
    or Flow++'s learned one."""
    return {"uniform": nf.UniformDequantization, "variational": VariationalDequantization}[name]


def build_model(settings):
    """The answer's Model with the coupling network and dequantization of ``settings``."""
    net = functools.partial(ConvNet, channels=settings.channels, blocks=settings.blocks)
    return nf.Model([nf.N_PIXELS], settings.n_flows, settings.n_hidden,
                    net=net if settings.coupling == "conv" else None,
                    dequantization=dequantization_layer(settings.dequantization))


def load_sampler(checkpoint_path, device="cpu"):
    """The answer's ``load_sampler`` for a run of this module."""
    return nf.load_sampler(checkpoint_path, device, Settings, build_model)


def main(argv=None):
    nf.main(argv, (DEFAULT, TEMPLATE), build_model, __doc__, out="results/extensions/nf_conv")


if __name__ == "__main__":
    harness.cli(main)
