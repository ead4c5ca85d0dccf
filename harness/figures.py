"""The figures the three scripts share, each written as PNG and PDF at the size it is printed.

PDFs carry no creation date, so redrawing an unchanged figure rewrites the same bytes."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

# Single plots are 3.3 in wide, so 8-9 pt text stays legible in a report without scaling.
plt.rcParams.update({"font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 8,
                     "xtick.labelsize": 8, "ytick.labelsize": 8})
PDF_METADATA = {"CreationDate": None, "Producer": None}


def save_figure(fig, stem):
    """Write ``stem``.png and ``stem``.pdf, then close the figure."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(stem.with_suffix(".png"), dpi=200, bbox_inches="tight")
    fig.savefig(stem.with_suffix(".pdf"), bbox_inches="tight", metadata=PDF_METADATA)
    plt.close(fig)


def image_grid(images, nrow, padding=2, pad_value=1.0):
    """Tile images [N, H, W], [N, 1, H, W] or flat square [N, H*W] (values in [0, 1]) into one
    [rows*H, nrow*W] array (torchvision's ``make_grid``)."""
    images = torch.as_tensor(images).detach().float().cpu()
    if images.dim() == 2:
        side = int(round(images.shape[1] ** 0.5))
        images = images.reshape(-1, side, side)
    images = images.reshape(len(images), 1, *images.shape[-2:])
    return make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)[0].numpy()


def save_image_grid(images, stem, nrow, row_labels=None, width=3.0):
    """Save images with values in [0, 1] as a grid ``width`` inches wide, PNG and PDF, with an
    optional label left of each row (e.g. the digits an interpolation joins). No title: a caption
    says what the grid shows."""
    grid = image_grid(images, nrow)
    height, grid_width = grid.shape
    fig, ax = plt.subplots(figsize=(width, width * height / grid_width))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    if row_labels:
        cell = (height - 2) / len(row_labels)
        ax.set_yticks([2 + cell * (i + 0.5) for i in range(len(row_labels))], row_labels)
        ax.tick_params(left=False)
    else:
        ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    save_figure(fig, stem)


def save_curves(curves, stem, ylabel, xlabel="epoch", start=0, references=None, ylim=None):
    """Line plot of named per-epoch curves (x = start, start+1, ...), PNG and PDF, with optional
    dashed horizontal reference levels {label: y} and y range."""
    fig, ax = plt.subplots(figsize=(3.3, 2.4), layout="constrained")
    for label, values in curves.items():
        ax.plot(range(start, start + len(values)), values, label=label, marker="o", markersize=2,
                linewidth=1.2)
    for label, level in (references or {}).items():
        ax.axhline(level, color="gray", linestyle="--", linewidth=1, label=f"{label} ({level:g})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, stem)
