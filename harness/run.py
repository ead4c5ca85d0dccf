"""The harness of one training run: flags, device, seeds, precision, log, checkpoint and resume,
the rebuild from committed weights, metrics.json, and ``cli``, which turns the errors a user can fix
into one line."""

import argparse
import contextlib
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from datasets.raw import DataError
from harness import schema, settings
from harness.files import (
    REPO,
    WEIGHTS_LIMIT,
    RunError,
    atomic_write,
    git_commit,
    load_checkpoint,
    load_verified,
    save_weights,
)

DEFAULT_DATA_ROOT = "./data/"


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
    """The flags every script shares: the settings (--template, --set) and where and how the run
    goes (``out`` is the script's default output folder)."""
    settings.add_arguments(parser)
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


def parse_args(argv, doc, out, default, template_flags=None):
    """The flags of a script whose settings are ``default``'s dataclass: those of ``add_run_args``,
    and ``template_flags`` {flag: field}, the course template's own flags, each a second spelling of
    ``--set field=value`` (an explicit --set of the same field wins)."""
    parser = argument_parser(doc)
    template_flags = template_flags or {}
    for flag, field in template_flags.items():
        kind = positive_int if isinstance(getattr(default, field), int) else positive_float
        parser.add_argument(f"--{flag}", type=kind, help=f"the template's flag for --set {field}=... "
                                                         f"(default {getattr(default, field)})")
    args = add_run_args(parser, out).parse_args(argv)
    args.overrides = [f"{field}={getattr(args, flag)}" for flag, field in template_flags.items()
                      if getattr(args, flag) is not None] + args.overrides
    return args


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


@contextlib.contextmanager
def matmul_precision(precision):
    """The training steps' matmuls in ``precision`` ("fp32" or "bf16"), the run's choice, which
    each script's epoch function takes as an argument. For "bf16", oneDNN rounds the inputs of every
    fp32 matmul to bfloat16 inside the kernel and accumulates in fp32: weights, activations,
    gradients and optimizer state all stay fp32, so the models need no casts. Evaluation runs
    outside this context, in full fp32."""
    if precision != "bf16":
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


# ---------------------------------------------------------------- the run

def script_name():
    """The running script as a path in the repository (a3_vae_template.py, extensions/vae_flows.py)."""
    path = Path(sys.argv[0]).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


class Run:
    """One training run in ``args.out`` with the resolved ``settings`` (the script's dataclass).

    Used the same way by the three ``main`` functions::

        run = Run(args, settings)             # seeds, device, precision, log
        extra = run.restore(model=..., ...)   # resumes if --resume and a checkpoint exist
        for epoch in run.epochs(settings.epochs):
            with run.timed(n_images):
                ...                           # one epoch of training, in run.precision
            run.record(loss=...)              # appends to the curves, logs one line
            run.save(extra, model=..., ...)   # one checkpoint dict, every epoch
        run.finish(model, results, weights={...}, milestones={...}, figures={...})

    The checkpoint holds the state_dicts given to ``save``, the curves, the wall time, the RNG states,
    the settings and the seed; a checkpoint of other settings or another seed is refused.

    ``--from_weights`` is a branch of each ``main``: ``load_weights`` in place of the training loop
    loads the modules (and returns the other entries) of ``<out>/weights.pt``, verified against the
    SHA-256 its metrics.json records, and takes the epochs and curves from metrics.json. ``finish``
    then compares what was measured again with the record and rewrites metrics.json only where a
    number differs; a rebuild never touches the committed train.log.
    """

    def __init__(self, args, run_settings):
        self.args = args
        self.settings = run_settings
        self.seed = args.seed
        self.device = get_device(args.device)
        seed_everything(args.seed)
        # Late in training tiny gradients and Adam moments become denormal floats, which CPUs handle
        # many times more slowly; flushing them to zero changes no result.
        torch.set_flush_denormal(True)
        self.precision = resolve_precision(args.precision, self.device)
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
        self.log(f"{script_name()}: {settings.describe(run_settings)} seed={self.seed} | "
                 f"{self.device}, training matmuls in {self.precision}")

    @property
    def is_new(self):
        """Nothing trained or recorded yet: the moment for the before-training figures."""
        return self.epoch == 0 and not self.curves

    def log(self, message):
        """Print ``message`` and append it to ``<out>/train.log`` (a rebuild only prints)."""
        print(message, flush=True)
        if not self.from_weights:
            with open(self.out / "train.log", "a") as f:
                f.write(message + "\n")

    def _check_settings(self, saved_settings, saved_seed, path):
        """A RunError naming the settings in which a saved run differs from this one."""
        asked = {**settings.as_dict(self.settings), "seed": self.seed}
        saved = {**saved_settings, "seed": saved_seed}
        if saved != asked:
            differ = ", ".join(f"{k}={saved.get(k)} (asked: {asked.get(k)})"
                               for k in sorted(saved.keys() | asked.keys()) if saved.get(k) != asked.get(k))
            raise RunError(f"{path} was trained with {differ}: rerun with its settings, or choose "
                           "another --out")

    def _recorded_metrics(self):
        path = self.out / "metrics.json"
        if not path.exists():
            raise RunError(f"--from_weights needs the metrics.json of a finished run in {self.out}")
        recorded = schema.read(path)
        if not recorded.get("weights_sha256"):
            raise RunError(f"{path} records no weights: this run's weights were not saved (over "
                           f"{WEIGHTS_LIMIT // 2**20} MB, or written before weights were); rebuild it "
                           "from its checkpoint with --resume, or retrain")
        self._check_settings(recorded["settings"], recorded["seed"], path)
        return recorded

    def restore(self, **stateful):
        """When resuming, load each module/optimizer of ``stateful`` from the checkpoint, and the
        curves, wall time and RNG states; returns the extra values ``save`` stored ({} otherwise)."""
        if not self.resuming:
            return {}
        payload = load_checkpoint(self.checkpoint_path, self.device)
        self._check_settings(payload["settings"], payload["seed"], self.checkpoint_path)
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

    def load_weights(self, **modules):
        """--from_weights: load those of ``modules`` that weights.pt holds, take the epochs and curves
        from metrics.json, and return weights.pt's other entries."""
        weights = load_verified(self.weights_path, self.recorded["weights_sha256"], self.device)
        for name, module in modules.items():
            module.load_state_dict(weights[name])
        self.epoch, self.curves = self.recorded["epochs_completed"], self.recorded["curves"]
        self.log(f"rebuilding from {self.weights_path} (epoch {self.epoch}), training nothing")
        return {name: value for name, value in weights.items() if name not in modules}

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
        payload = {"settings": settings.as_dict(self.settings), "seed": self.seed, "epoch": self.epoch,
                   "curves": self.curves, "seconds": self.seconds, "images": self.images, "rng": rng,
                   "extra": extra or {}, "state": {name: obj.state_dict() for name, obj in stateful.items()}}
        atomic_write(self.checkpoint_path, lambda tmp: torch.save(payload, tmp))

    def finish(self, model, results, weights=None, milestones=None, figures=None):
        """Write ``<out>/metrics.json`` (``harness.schema``): how the run was started, on what and
        from which code, its settings, curves and training time, the parameter count of ``model``,
        the epochs its figures show (``milestones``, {name: epoch}), the figures it drew
        (``figures``, {role: stem}) and the measured ``results`` {key: value}; and ``<out>/weights.pt``
        from ``weights`` {name: module or tensors}, what sampling and the figures need (names as given
        to ``load_weights``), with its SHA-256 in metrics.json.

        Rebuilt --from_weights, the record is updated with the non-empty ``results``, and written
        (with a ``rebuilt`` note) only if that changed a number. Returns the metrics."""
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        if self.from_weights:
            measured = {key: value for key, value in results.items() if value not in (None, [], {})}
            metrics = {**self.recorded, **measured}
            if not same_numbers(json.loads(schema.dumps(metrics)), self.recorded):
                metrics["rebuilt"] = {"command": command, "git_commit": git_commit(),
                                      "device_name": device_name(self.device),
                                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                schema.write(self.out / "metrics.json", metrics)
                self.log(f"rebuilt from {self.weights_path}: measures changed, written to "
                         f"{self.out / 'metrics.json'}")
            else:
                self.log(f"rebuilt from {self.weights_path}: every measure equals the recorded one")
            return metrics
        weights_sha256 = save_weights(self.weights_path, weights) if weights else None
        if weights and weights_sha256 is None:
            self.log(f"weights not saved: over the {WEIGHTS_LIMIT // 2**20} MB a run may commit")
        metrics = {
            "schema_version": schema.SCHEMA_VERSION,
            "script": script_name(),
            "command": command,
            "settings": settings.as_dict(self.settings),
            "seed": self.seed,
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
            "milestones": milestones or {},
            "figures": figures or {},
            **results,
        }
        schema.write(self.out / "metrics.json", metrics)
        self.log(f"done: {self.seconds / 60:.1f} min of training; metrics in {self.out / 'metrics.json'}")
        return metrics


def same_numbers(first, second, rel=1e-6):
    """Whether two JSON values are equal, floats to a relative ``rel``: a rebuild on another CPU or
    thread count may round the last digits of a sum differently without changing a measure."""
    if isinstance(first, dict) and isinstance(second, dict):
        return first.keys() == second.keys() and all(same_numbers(first[k], second[k], rel) for k in first)
    if isinstance(first, list) and isinstance(second, list):
        return len(first) == len(second) and all(same_numbers(a, b, rel)
                                                 for a, b in zip(first, second, strict=True))
    if isinstance(first, float) or isinstance(second, float):
        return isinstance(first, int | float) and isinstance(second, int | float) and \
            math.isclose(first, second, rel_tol=rel, abs_tol=1e-12)
    return first == second


def cli(main):
    """Run a script's ``main``; a data, settings, checkpoint or training error the user can fix ends
    in one line on stderr (exit status 1) instead of a traceback."""
    try:
        main()
    except (DataError, RunError, settings.SettingsError, schema.SchemaError) as error:
        raise SystemExit(f"error: {error}") from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted: the checkpoint of the last finished epoch is kept; "
                         "continue with --resume") from None

