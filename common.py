"""Plumbing shared by the three model scripts, used the same way by each.

``Run`` is the harness of one training run: it seeds everything, picks the device and the training
precision, keeps ``<out>/train.log``, writes one checkpoint dict after every epoch, resumes from it,
and writes ``<out>/metrics.json`` and the sampling weights ``<out>/weights.pt`` at the end; with
``--from_weights`` it rebuilds a run's figures and measures from those weights without training.
``cli`` runs a script's ``main`` and turns the errors a user can cause into one line. The rest
draws the figures (PNG + PDF) the scripts share.
"""

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
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

from datasets.raw import DataError  # noqa: E402

DEFAULT_DATA_ROOT = "./data/"
# Figures are drawn at the size they are printed (single plots 3.3 in wide), so 8-9 pt text stays
# legible in a report without scaling.
plt.rcParams.update({"font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 8,
                     "xtick.labelsize": 8, "ytick.labelsize": 8})


class RunError(RuntimeError):
    """A run cannot go on for a reason the user can fix (NaN loss, a checkpoint of other flags)."""


# ---------------------------------------------------------------- command-line flags

def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not np.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def existing_dir(text):
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"folder {text!r} does not exist (create it, or leave "
                                         f"--data_root out to use {DEFAULT_DATA_ROOT})")
    return text


def argument_parser(doc):
    """An argument parser whose --help shows the script's docstring as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_run_args(parser, out):
    """The flags every script shares; ``out`` is the script's default output folder."""
    parser.add_argument("--template", action="store_true",
                        help="train exactly as the course template does (see the script's docstring)")
    parser.add_argument("--out", default=out, help="folder for figures, metrics, log and checkpoint")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <out>/checkpoint.pt; on a finished run, redraw figures "
                             "and metrics")
    parser.add_argument("--from_weights", action="store_true",
                        help="train nothing: load <out>/weights.pt (checked against the SHA-256 in "
                             "<out>/metrics.json) and redraw the figures and sample measures")
    parser.add_argument("--seed", type=int, default=42, help="seed of every random number generator")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="auto picks CUDA, then MPS, then the CPU")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="matmuls of the training steps; bf16 keeps every tensor in fp32 and rounds "
                             "only the matmuls' inputs (CPU only); auto = bf16 on CPUs with AMX matrix "
                             "units, fp32 elsewhere. Evaluation is always fp32")
    parser.add_argument("--data_root", type=existing_dir, default=None,
                        help=f"folder holding MNIST/raw (default {DEFAULT_DATA_ROOT}, filled on first use)")
    return parser


# ---------------------------------------------------------------- device, seeds, precision

def get_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda was asked for, but torch sees no CUDA device")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RunError("--device mps was asked for, but torch sees no MPS device")
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def has_amx():
    """Whether this CPU has AMX matrix units, the only CPUs on which oneDNN's bf16 matmuls pay:
    without AMX it runs them in fp32 (AVX-512 BF16) or emulates them far slower than fp32 (AVX2)."""
    return torch.cpu._is_amx_tile_supported()


def resolve_precision(name, device):
    if name == "auto":
        return "bf16" if device.type == "cpu" and has_amx() else "fp32"
    if name == "bf16" and device.type != "cpu":
        raise RunError("--precision bf16 rounds the matmuls of a CPU (oneDNN); on a GPU use fp32")
    return name


_training_precision = "fp32"


@contextlib.contextmanager
def training_precision():
    """The training steps' matmuls in the precision the run chose, once, in ``Run``. For "bf16",
    oneDNN rounds the inputs of every fp32 matmul to bfloat16 inside the kernel and accumulates in
    fp32: weights, activations, gradients and optimizer state all stay fp32, so the models need no
    casts. Evaluation runs outside this context, in full fp32."""
    if _training_precision != "bf16":
        yield
        return
    previous = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = previous


def check_finite(loss, where):
    """Stop on NaN/inf before the optimizer step can poison the weights; the last checkpoint stays."""
    if not torch.isfinite(loss):
        raise RunError(f"the loss became {loss.item()} at {where}. The checkpoint of the last finished "
                       "epoch is kept: rerun with --resume, or start again with another --seed")


# ---------------------------------------------------------------- files

def atomic_write(path, write):
    """Run ``write(tmp_path)`` then rename over ``path``: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def git_commit():
    """The commit of the code, with ``-dirty`` when the code a run executes (the scripts, common.py,
    datasets/, evaluation/ and the requirements) differs from it."""
    root = Path(__file__).resolve().parent
    code = ["a3_*.py", "common.py", "datasets", "evaluation", "requirements.txt"]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *code], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def sha256(data):
    return hashlib.sha256(data).hexdigest()


# Weights files up to this size are committed with the run (git keeps them comfortably); larger ones
# (the flow's 110 MB) are not written, and only a checkpoint or retraining brings such a run back.
WEIGHTS_LIMIT = 10 * 2**20


def save_weights(path, entries):
    """Write ``entries`` {name: module or tensors} as a weights-only file (modules as their
    state_dicts, so ``torch.load(weights_only=True)`` reads it); returns its SHA-256, or None, and
    no file, when it would exceed WEIGHTS_LIMIT."""
    buffer = io.BytesIO()
    torch.save({name: obj.state_dict() if hasattr(obj, "state_dict") else obj
                for name, obj in entries.items()}, buffer)
    data = buffer.getvalue()
    if len(data) > WEIGHTS_LIMIT:
        Path(path).unlink(missing_ok=True)
        return None
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return sha256(data)


def load_verified(path, expected_sha256, device="cpu"):
    """``torch.load(path, weights_only=True)`` once the file's SHA-256 is ``expected_sha256``; a missing,
    corrupted or other file is a RunError saying so."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise RunError(f"{path} does not exist") from None
    if sha256(data) != expected_sha256:
        raise RunError(f"{path} has SHA-256 {sha256(data)[:16]}..., not the {str(expected_sha256)[:16]}... "
                       "recorded for it: the file is corrupted or from another run (restore it with git "
                       "checkout, or retrain)")
    return torch.load(io.BytesIO(data), map_location=device, weights_only=True)


def load_checkpoint(path, device="cpu"):
    """The checkpoint dict that ``Run.save`` wrote, or a RunError naming what is wrong with the file."""
    try:
        payload = torch.load(path, map_location=device, weights_only=False)
    except FileNotFoundError:
        raise RunError(f"{path} does not exist: train the model first") from None
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise RunError(f"{path} cannot be read as a checkpoint ({type(error).__name__}): delete it, "
                       "or point --out elsewhere") from None
    if not isinstance(payload, dict) or not {"args", "state", "epoch"} <= payload.keys():
        raise RunError(f"{path} is not a checkpoint of this code: delete it, or point --out elsewhere")
    return payload


# ---------------------------------------------------------------- the run harness

# Flags that do not change what a run computes: a resumed run may differ from the first in these.
_RESUMABLE_FLAGS = ("out", "resume", "from_weights", "device", "data_root")


class Run:
    """One training run in ``args.out``.

    Use it as the three ``main`` functions do::

        run = Run(args)                       # seeds, device, precision, log
        state = run.restore(model=..., ...)   # resumes if --resume and a checkpoint exist
        for epoch in run.epochs(args.epochs):
            with run.timed(n_images):
                ...                           # one epoch of training
            run.record(loss=...)              # appends to the curves, logs one line
            run.save(model=..., ...)          # one checkpoint dict, every epoch
        run.finish(model, weights={...}, test=...)  # metrics.json and weights.pt

    The checkpoint holds the state_dicts given to ``save``, the curves, the wall time, the RNG
    states and the flags; a checkpoint written with other flags is refused.

    With ``--from_weights`` the same ``main`` rebuilds a finished run without training:
    ``restore`` loads the modules (and returns the other entries) of ``<out>/weights.pt``, verified
    against the SHA-256 that ``<out>/metrics.json`` records, and takes the epochs, curves and wall
    time from metrics.json, so the epoch loop is empty and ``main`` goes straight to its figures and
    evaluation; ``finish`` then updates metrics.json with what was measured again.
    """

    def __init__(self, args):
        global _training_precision
        self.args = args
        self.device = get_device(args.device)
        seed_everything(args.seed)
        # Late in training tiny gradients and Adam moments become denormal floats, which CPUs handle
        # many times more slowly; flushing them to zero changes no result.
        torch.set_flush_denormal(True)
        self.precision = _training_precision = resolve_precision(args.precision, self.device)
        self.data_root = args.data_root or DEFAULT_DATA_ROOT
        Path(self.data_root).mkdir(parents=True, exist_ok=True)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = self.out / "checkpoint.pt"
        self.weights_path = self.out / "weights.pt"
        self.from_weights = args.from_weights
        self.resuming = args.resume and self.checkpoint_path.exists() and not self.from_weights
        self.recorded = self._recorded_metrics() if self.from_weights else None
        if not (self.resuming or self.from_weights):
            (self.out / "train.log").unlink(missing_ok=True)
        self.epoch = 0
        self.curves = {}
        self.seconds = 0.0
        self.images = 0
        self._epoch_started = None
        self.log(f"{Path(sys.argv[0]).name}: {self.describe_flags()} | {self.device}, "
                 f"training matmuls in {self.precision}")

    def describe_flags(self):
        flags = [(k, v) for k, v in vars(self.args).items()
                 if k not in _RESUMABLE_FLAGS and v is not False and v is not None]
        return " ".join(f"--{k}" if v is True else f"--{k} {v}" for k, v in flags)

    def log(self, message):
        """Print ``message`` and append it to ``<out>/train.log``."""
        print(message, flush=True)
        with open(self.out / "train.log", "a") as f:
            f.write(message + "\n")

    def _recorded_metrics(self):
        path = self.out / "metrics.json"
        if not path.exists():
            raise RunError(f"--from_weights needs the metrics.json of a finished run in {self.out}")
        recorded = json.loads(path.read_text())
        if not recorded.get("weights_sha256"):
            raise RunError(f"{path} records no weights: this run's weights were not saved (over "
                           f"{WEIGHTS_LIMIT // 2**20} MB, or written before weights were); rebuild it "
                           "from its checkpoint with --resume, or retrain")
        self._check_flags(recorded["args"], path)
        return recorded

    def _check_flags(self, saved, path):
        """A RunError naming the flags in which ``saved`` (a run's recorded flags) differ from ours."""
        saved = {k: v for k, v in saved.items() if k not in _RESUMABLE_FLAGS}
        asked = {k: v for k, v in vars(self.args).items() if k not in _RESUMABLE_FLAGS}
        if saved != asked:
            differ = ", ".join(f"--{k} {saved.get(k)} (asked: {asked.get(k)})"
                               for k in sorted(saved.keys() | asked.keys()) if saved.get(k) != asked.get(k))
            raise RunError(f"{path} was trained with {differ}: rerun with its flags, or choose another --out")

    def restore(self, **stateful):
        """When resuming, load each module/optimizer of ``stateful`` from the checkpoint, and the
        curves, wall time and RNG states; returns the extra values ``save`` stored ({} otherwise).
        With --from_weights, load those of ``stateful`` that weights.pt holds and return its other
        entries."""
        if self.from_weights:
            return self._restore_weights(stateful)
        if not self.resuming:
            return {}
        payload = load_checkpoint(self.checkpoint_path, self.device)
        self._check_flags(payload["args"], self.checkpoint_path)
        for name, obj in stateful.items():
            obj.load_state_dict(payload["state"][name])
        self.epoch, self.curves = payload["epoch"], payload["curves"]
        self.seconds, self.images = payload["seconds"], payload["images"]
        rng = payload["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        self.log(f"resumed from {self.checkpoint_path} after epoch {self.epoch}")
        return payload["extra"]

    def _restore_weights(self, stateful):
        weights = load_verified(self.weights_path, self.recorded["weights_sha256"], self.device)
        for name, obj in stateful.items():
            if name in weights:
                obj.load_state_dict(weights[name])
        self.epoch, self.curves = self.recorded["epochs_completed"], self.recorded["curves"]
        self.log(f"rebuilding from {self.weights_path} (epoch {self.epoch}), training nothing")
        return {name: value for name, value in weights.items() if name not in stateful}

    def epochs(self, n_epochs):
        """The epochs still to train, counted from 1 to ``n_epochs``."""
        return range(self.epoch + 1, n_epochs + 1)

    @contextlib.contextmanager
    def timed(self, n_images):
        """Times one epoch of training on ``n_images`` images into the run's wall time."""
        started = time.perf_counter()
        yield
        self.epoch += 1
        self._epoch_started = self.seconds
        self.seconds += time.perf_counter() - started
        self.images += n_images

    def record(self, **values):
        """Append this epoch's ``values`` (and the wall time so far) to the curves; log one line."""
        for key, value in {**values, "wall_time_s": self.seconds}.items():
            self.curves.setdefault(key, []).append(value)
        shown = "  ".join(f"{k} {v:.4g}" for k, v in values.items())
        took = "" if self._epoch_started is None else f"  ({self.seconds - self._epoch_started:.1f} s)"
        self.log(f"epoch {self.epoch}  {shown}{took}")

    def save(self, extra=None, **stateful):
        """Write the checkpoint: the state_dicts of ``stateful``, ``extra`` values, curves, time, RNGs."""
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        payload = {"args": vars(self.args), "epoch": self.epoch, "curves": self.curves,
                   "seconds": self.seconds, "images": self.images, "rng": rng, "extra": extra or {},
                   "state": {name: obj.state_dict() for name, obj in stateful.items()}}
        atomic_write(self.checkpoint_path, lambda tmp: torch.save(payload, tmp))

    def finish(self, model, weights=None, **results):
        """Write ``<out>/metrics.json``: how the run was started, on what and from which code, its
        curves and training time, the parameter count of ``model`` and the measured ``results``; and
        ``<out>/weights.pt`` from ``weights`` {name: module or tensors}, what sampling and the
        figures need (names as given to ``restore``), with its SHA-256 in metrics.json.

        Rebuilt --from_weights, the recorded metrics are kept and updated with ``results``; a result
        given empty (such as a curve that needs training-time snapshots) keeps its recorded value."""
        if self.from_weights:
            measured = {key: value for key, value in results.items() if value not in (None, [], {})}
            metrics = {**self.recorded, **measured,
                       "rebuilt": {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                                   "git_commit": git_commit(), "device_name": device_name(self.device),
                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}
            write_json(self.out / "metrics.json", metrics)
            self.log(f"rebuilt from {self.weights_path}; metrics in {self.out / 'metrics.json'}")
            return metrics
        weights_sha256 = save_weights(self.weights_path, weights) if weights else None
        if weights and weights_sha256 is None:
            self.log(f"weights not saved: over the {WEIGHTS_LIMIT // 2**20} MB a run may commit")
        metrics = {
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "args": vars(self.args),
            "git_commit": git_commit(),
            "device": str(self.device),
            "device_name": device_name(self.device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "training_precision": self.precision,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "n_params": sum(p.numel() for p in model.parameters()),
            "epochs_completed": self.epoch,
            "wall_time_s": self.seconds,
            "images_per_s": self.images / self.seconds if self.seconds else 0.0,
            "curves": self.curves,
            "weights_sha256": weights_sha256,
            **results,
        }
        write_json(self.out / "metrics.json", metrics)
        self.log(f"done: {self.seconds / 60:.1f} min of training; metrics in {self.out / 'metrics.json'}")
        return metrics


def device_name(device):
    """The CPU's or GPU's model name, for metrics.json."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cli(main):
    """Run a script's ``main``; a data, checkpoint or training error the user can fix ends in one
    line on stderr (exit status 1) instead of a traceback."""
    try:
        main()
    except (DataError, RunError) as error:
        raise SystemExit(f"error: {error}") from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted: the checkpoint of the last finished epoch is kept; "
                         "continue with --resume") from None


# ---------------------------------------------------------------- figures

def save_figure(fig, stem):
    """Write ``stem``.png and ``stem``.pdf, then close the figure."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(stem.with_suffix(".png"), dpi=200, bbox_inches="tight")
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
