"""Beyond the assignment (question 3.4): RealNVP's own multi-scale architecture (Dinh et al., 2017,
sec. 3.6), handed to the flow of a3_nf_template.py through its ``flow=`` seam.

    python -m extensions.nf_multiscale                     # into results/extensions/nf_multiscale
    python -m extensions.nf_multiscale --set dequantization=variational \\
        --out results/extensions/nf_multiscale_variational  # with Flow++'s learned noise q(u | x)

The image goes through scales. Each but the last applies checkerboard affine couplings, a squeeze
(each 2x2 block of pixels into 4 channels: half the resolution, four times the channels), couplings
in which half the channels transform the other half, and then factors out half its channels: they
are final latent variables, N(0, I) under the prior, and the next scale works on the other half
only. The last scale applies checkerboard couplings alone. On MNIST, with three scales:

    [1, 28, 28] -> squeeze -> [4, 14, 14] -> 2 channels out (392 values)
    [2, 14, 14] -> squeeze -> [8, 7, 7]   -> 4 channels out (196 values)
    [4, 7, 7]   -> the final checkerboard couplings (196 values)

Coupling networks are small residual convolutional networks whose output convolution starts at zero,
so every coupling, and the whole flow, starts as the identity. Everything else is the answer's: its
Model (``flow=MultiScaleFlow(...)``, ``dequantization=`` the answer's uniform or
extensions.nf_couplings' variational one), epoch loop, figures, evaluation and ``main``.
``--template`` trains this flow the course template's way (the answer's TEMPLATE).
"""

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

import a3_nf_template as nf
import harness
from extensions.nf_couplings import DEQUANTIZATIONS, dequantization_layer

IMAGE_SHAPE = (1, 28, 28)
MAX_SCALES = 3  # 28 -> 14 -> 7: a third squeeze would need an even grid


@dataclasses.dataclass(frozen=True)
class Settings(nf.Settings):
    """The answer's settings and this flow's; the answer's n_flows and n_hidden, the sizes of its MLP
    flow, play no part here."""

    # "uniform" (the answer's) or "variational": Flow++'s learned q(u | x) (Ho et al., 2019)
    dequantization: str = "uniform"
    n_scales: int = 3  # scales of the architecture, 1 to 3: each but the last factors out half its channels
    # couplings of each kind, checkerboard and channel-wise, in every scale but the last: RealNVP's 3
    couplings: int = 3
    final_couplings: int = 4  # checkerboard couplings of the last scale: RealNVP's 4
    channels: int = 64  # hidden channels of every coupling's residual network
    blocks: int = 1  # residual blocks (two convolutions each) of every coupling's network
    # Convolutional couplings have far fewer parameters than the template's MLPs: smaller batches at the
    # template's learning rate, more steps per image, warmed up over a quarter of an epoch, for fewer
    # epochs (extensions.nf_couplings' training)
    batch_size: int = 128
    lr: float = 1e-3
    warmup_epochs: float = 0.25
    epochs: int = 12

    def __post_init__(self):
        super().__post_init__()
        harness.settings.positive(self, "n_scales", "couplings", "final_couplings", "channels", "blocks")
        harness.settings.one_of(self, "dequantization", DEQUANTIZATIONS)
        if self.n_scales > MAX_SCALES:
            raise harness.settings.SettingsError(f"--set n_scales={self.n_scales}: n_scales is at most "
                                                 f"{MAX_SCALES} (28x28 halves to 14x14 and 7x7, then is odd)")


DEFAULT = Settings()
TEMPLATE = Settings(**dataclasses.asdict(nf.TEMPLATE))  # the template's training, this flow


# ---------------------------------------------------------------- pieces

def affine(h, ldj, log_scale, translation, reverse):
    """h * exp(log_scale) + translation, or its inverse, and the log-determinant plus or minus the
    sum of the log-scales of each image."""
    if not reverse:
        return h * torch.exp(log_scale) + translation, ldj + log_scale.flatten(1).sum(dim=1)
    return (h - translation) * torch.exp(-log_scale), ldj - log_scale.flatten(1).sum(dim=1)


class ResNet(nn.Module):
    """A coupling network: an input convolution, residual blocks h + conv(elu(conv(elu(h)))) (He et
    al., 2016; RealNVP's choice, Dinh et al., 2017, sec. 4.1) and an output convolution initialised
    to zero, so that the coupling it drives starts as the identity. [B, c_in, H, W] -> [B, c_out, H, W]."""

    def __init__(self, in_channels, out_channels, channels=64, blocks=1):
        super().__init__()
        self.input = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ELU(), nn.Conv2d(channels, channels, 3, padding=1),
                          nn.ELU(), nn.Conv2d(channels, channels, 3, padding=1))
            for _ in range(blocks))
        self.output = nn.Conv2d(channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x):
        h = self.input(x)
        for block in self.blocks:
            h = h + block(h)
        return self.output(F.elu(h))


def checkerboard(size, parity):
    """A [1, 1, size, size] float checkerboard, 1 where (row + column) % 2 == parity."""
    i, j = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((i + j) % 2 == parity).float().view(1, 1, size, size)


class CheckerboardCoupling(nn.Module):
    """Affine coupling with a spatial checkerboard mask on [B, C, H, W] (Dinh et al., 2017, sec. 3.4),
    the same mask in every channel: the pixels where mask = 1 pass through and, with the mask as one
    more channel, condition the log-scale s and translation t of the others,

        h' = mask * h + (1 - mask) * (h * exp(s) + t),   log |det| = sum over the others of s.

    s = tanh(.) is bounded to (-1, 1), which keeps exp() and the inverse stable. On an even grid the
    network runs on the squeezed input (pixel_unshuffle, as extensions.nf_couplings' ConvNet): a
    quarter of the cost, and each convolution sees twice as far."""

    def __init__(self, in_channels, size, parity, channels=64, blocks=1):
        super().__init__()
        self.register_buffer("mask", checkerboard(size, parity), persistent=False)
        self.squeezed = size % 2 == 0
        factor = 4 if self.squeezed else 1
        self.net = ResNet(factor * (in_channels + 1), factor * 2 * in_channels, channels, blocks)

    def scale_and_translation(self, h):
        x = torch.cat([h * self.mask, self.mask.expand(len(h), -1, -1, -1)], dim=1)
        out = F.pixel_shuffle(self.net(F.pixel_unshuffle(x, 2)), 2) if self.squeezed else self.net(x)
        log_scale, translation = out.chunk(2, dim=1)
        inverse_mask = 1 - self.mask
        return torch.tanh(log_scale) * inverse_mask, translation * inverse_mask

    def forward(self, h, ldj, reverse=False):
        return affine(h, ldj, *self.scale_and_translation(h), reverse)


class ChannelCoupling(nn.Module):
    """Affine coupling across channels on [B, C, H, W] (Dinh et al., 2017, sec. 3.4): one half of the
    channels (the first for parity 0, the second for parity 1) passes through and conditions the
    bounded log-scale and the translation of the other half."""

    def __init__(self, in_channels, parity, channels=64, blocks=1):
        super().__init__()
        self.parity = parity
        half = in_channels // 2
        self.net = ResNet(half, 2 * half, channels, blocks)

    def forward(self, h, ldj, reverse=False):
        halves = list(h.chunk(2, dim=1))
        condition, transformed = halves[self.parity], halves[1 - self.parity]
        log_scale, translation = self.net(condition).chunk(2, dim=1)
        halves[1 - self.parity], ldj = affine(transformed, ldj, torch.tanh(log_scale), translation, reverse)
        return torch.cat(halves, dim=1), ldj


class Squeeze(nn.Module):
    """Space to depth (Dinh et al., 2017, sec. 3.6): each 2x2 block of every channel becomes 4 channels,
    [B, C, H, W] -> [B, 4C, H/2, W/2]. A permutation of the values: log |det| = 0. Reverse: depth to
    space."""

    def forward(self, h, ldj, reverse=False):
        return (F.pixel_shuffle(h, 2) if reverse else F.pixel_unshuffle(h, 2)), ldj


class Split(nn.Module):
    """Factoring out (Dinh et al., 2017, sec. 3.6): [B, C, H, W] -> (the first C/2 channels, which go
    on, the last C/2, final latent variables). A permutation of the values: log |det| = 0. Reverse:
    the pair back into one tensor."""

    def forward(self, h, ldj, reverse=False):
        if reverse:
            return torch.cat(h, dim=1), ldj
        return h.chunk(2, dim=1), ldj


def run(layers, h, ldj, reverse=False):
    """``layers`` in order, or reversed and each inverted."""
    for layer in (reversed(layers) if reverse else layers):
        h, ldj = layer(h, ldj, reverse=reverse)
    return h, ldj


# ---------------------------------------------------------------- the flow

class MultiScaleFlow(nn.Module):
    """RealNVP's multi-scale architecture (Dinh et al., 2017, sec. 3.6) with the flow interface of
    a3_nf_template.py on flat z [B, 784]: ``n_scales - 1`` scales of ``couplings`` checkerboard
    couplings, a squeeze, ``couplings`` channel couplings and a factoring out of half the channels, then
    ``final_couplings`` checkerboard couplings on what remains; masks alternate from one coupling to
    the next. The factored-out channels and the last scale's output are laid out again as a 28x28
    image (each factoring out and squeeze undone, a permutation with log |det| = 0) and flattened,
    so that a flow of identity couplings is the identity on z."""

    def __init__(self, n_scales=3, couplings=3, final_couplings=4, channels=64, blocks=1):
        super().__init__()
        c, size = IMAGE_SHAPE[:2]
        self.scales = nn.ModuleList()
        for _ in range(n_scales - 1):
            self.scales.append(nn.ModuleList([
                *(CheckerboardCoupling(c, size, k % 2, channels, blocks) for k in range(couplings)),
                Squeeze(),
                *(ChannelCoupling(4 * c, k % 2, channels, blocks) for k in range(couplings)),
            ]))
            c, size = 2 * c, size // 2  # four times the channels after the squeeze, half of them factored out
        self.final = nn.ModuleList(CheckerboardCoupling(c, size, k % 2, channels, blocks)
                                   for k in range(final_couplings))
        self.squeeze, self.split = Squeeze(), Split()
        self.z_shape = (nf.N_PIXELS,)

    def forward(self, z, ldj, reverse=False):
        h = z.view(-1, *IMAGE_SHAPE)
        factored = []
        if not reverse:
            for scale in self.scales:
                h, ldj = run(scale, h, ldj)
                (h, out), ldj = self.split(h, ldj)
                factored.append(out)
            h, ldj = run(self.final, h, ldj)
            for out in reversed(factored):  # the latent variables laid out as the image
                h, ldj = self.split((h, out), ldj, reverse=True)
                h, ldj = self.squeeze(h, ldj, reverse=True)
            return h.flatten(1), ldj
        for _ in self.scales:  # the latent layout back into the factored-out pieces
            h, ldj = self.squeeze(h, ldj)
            (h, out), ldj = self.split(h, ldj)
            factored.append(out)
        h, ldj = run(self.final, h, ldj, reverse=True)
        for scale, out in zip(reversed(self.scales), reversed(factored), strict=True):
            h, ldj = self.split((h, out), ldj, reverse=True)
            h, ldj = run(scale, h, ldj, reverse=True)
        return h.flatten(1), ldj


def build_model(settings):
    """The answer's Model with the multi-scale flow and the dequantization of ``settings``."""
    flow = MultiScaleFlow(settings.n_scales, settings.couplings, settings.final_couplings, settings.channels,
                          settings.blocks)
    return nf.Model([nf.N_PIXELS], flow=flow, dequantization=dequantization_layer(settings.dequantization))


def load_sampler(checkpoint_path, device="cpu"):
    """The answer's ``load_sampler`` for a run of this module."""
    return nf.load_sampler(checkpoint_path, device, Settings, build_model)


def main(argv=None):
    nf.main(argv, (DEFAULT, TEMPLATE), build_model, __doc__, out="results/extensions/nf_multiscale")


if __name__ == "__main__":
    harness.cli(main)
