"""The evaluation's figures: each model's memorisation check, and precision against recall of all."""

import matplotlib.pyplot as plt
import numpy as np
import torch

from harness.figures import image_grid, save_figure

N_CLOSEST = 8  # sample / nearest-training-image pairs shown, PAIRS_PER_ROW to a row
PAIRS_PER_ROW = 4


def save_memorisation_figure(images, train, nearest, test_distances, result, stem):
    """Left, for pixel and feature space, the distribution of distances from the samples to their
    nearest training image beside that from test images to theirs, with the threshold below which
    a sample counts as memorised (the test distances' 1st percentile); right, the N_CLOSEST samples
    nearest (in pixels) to a training image, each above that training image."""
    fig = plt.figure(figsize=(6.8, 2.4), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[2.1, 1])
    axes = left.subplots(1, 2)
    for ax, space in zip(axes, ("pixel", "feature"), strict=True):
        samples, test = nearest[space][0].numpy(), test_distances[space].numpy()
        bins = np.linspace(0, max(samples.max(), test.max()), 60)
        ax.hist(test, bins=bins, density=True, histtype="step", linewidth=1.2, label="test image → training")
        ax.hist(samples, bins=bins, density=True, histtype="step", linewidth=1.2, label="sample → training")
        ax.axvline(result[space]["threshold"], color="gray", linestyle="--", linewidth=1,
                   label="closest 1% of test images")
        ax.text(0.97, 0.95, f"{100 * result[space]['share']:.1f}% of samples\nleft of the line",
                transform=ax.transAxes, ha="right", va="top", fontsize=7)
        ax.set_xlabel(f"{space} distance to the\nnearest training image")
        ax.set_yticks([])
    axes[0].set_ylabel("density")
    left.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=7,
                frameon=False)
    distances, indices = nearest["pixel"]
    closest = distances.argsort()[:N_CLOSEST]
    samples = torch.as_tensor(images)[closest].reshape(-1, PAIRS_PER_ROW, 784)
    training = train[indices[closest]].reshape(-1, PAIRS_PER_ROW, 784)
    rows = torch.stack([samples, training], dim=1).reshape(-1, 784)  # sample row, its training row, ...
    ax = right.subplots()
    ax.imshow(image_grid(rows, nrow=PAIRS_PER_ROW), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([16 + 30 * i for i in range(len(rows) // PAIRS_PER_ROW)],
                  ["sample", "nearest\ntraining"] * (N_CLOSEST // PAIRS_PER_ROW))
    ax.tick_params(left=False, labelsize=7)
    for spine in ax.spines.values():
        spine.set_visible(False)
    save_figure(fig, stem)
