"""Plumbing shared by the three model scripts: flags, device, seeding, checkpoints, metrics, figures.

Nothing model-specific lives here; each script reads top to bottom on its own and calls these.
"""

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

DEFAULT_DATA_ROOT = "./data/"


# ---------------------------------------------------------------- command-line flags

def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def unit_interval(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not np.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not np.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def existing_dir(text):
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"folder {text!r} does not exist (create it, or leave "
                                         f"--data-root out to use {DEFAULT_DATA_ROOT})")
    return text


def add_common_args(parser, out):
    """The flags every script shares. ``out`` is the script's default output folder."""
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where to train; auto picks CUDA, then MPS, then CPU")
    parser.add_argument("--seed", type=int, default=42, help="seed for torch, numpy and random")
    parser.add_argument("--data-root", type=existing_dir, default=None,
                        help=f"folder holding MNIST/raw (default {DEFAULT_DATA_ROOT}, "
                             "created and filled on first use)")
    parser.add_argument("--out", default=out, help="folder for figures, metrics and checkpoints")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <out>/checkpoint.pt if it exists")
    return parser


def add_precision_arg(parser):
    """``--precision`` for the scripts whose training matmuls may run in bfloat16."""
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="matmuls of the training steps (evaluation is always fp32); auto = bf16 "
                             "on CPUs with AMX units, fp32 elsewhere")
    return parser


def data_root(args):
    root = args.data_root or DEFAULT_DATA_ROOT
    Path(root).mkdir(parents=True, exist_ok=True)
    return root


# ---------------------------------------------------------------- device and seeding

def get_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(args):
    """The start of every script's ``main``: returns (device, data folder) with every RNG seeded."""
    device = get_device(args.device)
    seed_everything(args.seed)
    # Late in training, tiny gradients and Adam moments turn into denormal floats, which the CPU handles
    # about twice as slowly; flushing them to zero changes no result.
    torch.set_flush_denormal(True)
    return device, data_root(args)


def training_precision(name, device):
    """The precision of the training matmuls for a ``--precision`` flag: "auto" is bf16 on a CPU with
    AMX matrix units, where bfloat16 products run about 5x faster than fp32, and fp32 elsewhere."""
    if name != "auto":
        return name
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16" if device.type == "cpu" and has_amx else "fp32"


def autocast(precision, device):
    """Mixed precision for a training forward pass: with "bf16" the matmuls run in bfloat16, while
    weights, gradients and optimizer state stay fp32. A no-op for "fp32". Open one region per forward
    pass: the bf16 copies of the weights are cached until the region ends, so an optimizer step inside
    it would not reach the next forward pass."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@contextlib.contextmanager
def bf16_matmuls(precision, device):
    """Whole training steps, forward and backward passes and optimizer steps, with their matmuls in
    ``precision``; every tensor stays fp32. On a CPU, "bf16" has oneDNN round the inputs of each fp32
    matmul to bfloat16 inside the kernel (the CPU's counterpart of TF32 on GPUs): no cast ops and no
    bf16 copies of the weights, whose overhead eats autocast's gain on small layers. Elsewhere it is
    autocast without its weight cache, which an optimizer step inside the region would make stale."""
    if precision != "bf16":
        yield
    elif device.type == "cpu":
        previous = torch.backends.mkldnn.matmul.fp32_precision
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        try:
            yield
        finally:
            torch.backends.mkldnn.matmul.fp32_precision = previous
    else:
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
            yield


# ---------------------------------------------------------------- checkpoints and metrics

def atomic_write(path, write):
    """Run ``write(tmp_path)`` then rename over ``path``: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(path, **state):
    """Save ``state`` (modules and optimizers are stored by their state_dict) plus all RNG states."""
    payload = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}
    payload["rng"] = _rng_state()
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path, device="cpu", restore_rng=True, **stateful):
    """Load a checkpoint, restore every object in ``stateful`` (by name) and the RNG states.

    Returns the whole payload, so plain values (epoch, curves) can be read from it.
    """
    payload = torch.load(path, map_location=device, weights_only=False)
    for name, obj in stateful.items():
        obj.load_state_dict(payload[name])
    if restore_rng:
        rng = payload["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
    return payload


def git_commit():
    """The commit the code came from, with ``-dirty`` when the code a run executes (tracked Python
    files outside report/ and tests/, and the requirements) has uncommitted changes."""
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "*.py",
                                "requirements.txt", ":(exclude)report", ":(exclude)tests"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def run_info(args, device):
    """What every metrics.json starts with: how the run was started, on what, from which code."""
    return {
        "args": {k: v for k, v in vars(args).items()},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "git_commit": git_commit(),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_log(out, fresh):
    """A ``log(message)`` that prints and appends to ``<out>/train.log``, so a run keeps its log however
    it was started; ``fresh`` (a new run, not a resume) starts the file anew."""
    path = Path(out) / "train.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    if fresh:
        path.unlink(missing_ok=True)

    def log(message):
        print(message, flush=True)
        with open(path, "a") as f:
            f.write(message + "\n")

    return log


def write_json(path, obj):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


class NonFiniteLossError(RuntimeError):
    pass


def check_finite(loss, where):
    """Stop on NaN/inf before the optimizer step can poison the weights; the last checkpoint stays."""
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"loss became {loss.item()} at {where}; stopping. The last good "
                                 "checkpoint is kept: lower the learning rate and --resume.")


# ---------------------------------------------------------------- figures

def save_figure(fig, stem):
    """Write ``stem``.png and ``stem``.pdf, then close the figure."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(stem.with_suffix(".png"), dpi=150, bbox_inches="tight")
    fig.savefig(stem.with_suffix(".pdf"), bbox_inches="tight")
    plt.close(fig)


def image_grid(images, nrow, padding=2, pad_value=1.0):
    """Tile images [N, H, W], [N, 1, H, W] or flat square [N, H*W] (values in [0, 1]) into one
    [rows*H, nrow*W] array."""
    images = torch.as_tensor(images).detach().float().cpu()
    n = images.shape[0]
    if images.dim() == 2:
        side = int(round(images.shape[1] ** 0.5))
        images = images.reshape(n, side, side)
    h, w = images.shape[-2:]
    images = images.reshape(n, h, w)
    rows = -(-n // nrow)
    grid = torch.full((rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value)
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top:top + h, left:left + w] = images[i]
    return grid.numpy()


def save_image_grid(images, stem, nrow, title=None, row_labels=None):
    """Save images with values in [0, 1] as a grid, PNG and PDF, with an optional title and one
    label per row (e.g. the digits an interpolation joins)."""
    grid = image_grid(images, nrow)
    height, width = grid.shape
    fig, ax = plt.subplots(figsize=(max(2.0, width / 40), max(2.0, height / 40) + (0.3 if title else 0)))
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
    if title:
        ax.set_title(title, fontsize=9)
    save_figure(fig, stem)


def save_curves(curves, stem, ylabel, title=None, xlabel="epoch", start=0, references=None):
    """Line plot of named per-epoch curves (x = start, start+1, ...), PNG and PDF, with optional
    dashed horizontal reference levels given as {label: y}."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, values in curves.items():
        ax.plot(range(start, start + len(values)), values, label=label, marker="o", markersize=2.5)
    for label, level in (references or {}).items():
        ax.axhline(level, color="gray", linestyle="--", linewidth=1, label=f"{label} ({level:g})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, stem)


# ---------------------------------------------------------------- speed

class Stopwatch:
    """Wall time and images/s of the training passes; survives resume via ``state``."""

    def __init__(self, state=None):
        state = state or {}
        self.seconds = state.get("seconds", 0.0)
        self.images = state.get("images", 0)
        self._start = None

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._start

    def count(self, n):
        self.images += n

    @property
    def images_per_second(self):
        return self.images / self.seconds if self.seconds else 0.0

    def state(self):
        return {"seconds": self.seconds, "images": self.images}
