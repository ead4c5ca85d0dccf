"""``metrics.json``, the one record a run leaves: its declared shape, its writer and its reader.

Every run folder holds one, written by ``harness.Run.finish`` through ``write`` and read by every
table and by the report through ``read``, so that no reader re-derives what a script did: the
settings it resolved, the epochs its figures show (``milestones``) and the files it drew
(``figures``) are recorded here.
"""

import json
from pathlib import Path

SCHEMA_VERSION = 2

# Every run writes these.
REQUIRED = {
    "schema_version": "this module's SCHEMA_VERSION when the run was written",
    "script": "what made the run: an answer file (a3_vae_template.py) or an extension module",
    "command": "the command line, as typed",
    "settings": "the resolved settings: the script's Settings dataclass as a dict",
    "seed": "the seed of every random number generator",
    "git_commit": "the commit of the code, with -dirty when the run's code differed from it",
    "device": "torch's device (cpu, cuda)",
    "device_name": "the CPU's or GPU's model name",
    "torch": "torch.__version__",
    "threads": "torch.get_num_threads()",
    "training_precision": "fp32, or bf16 for the training steps' matmuls",
    "finished": "when the run finished (local time, ISO 8601)",
    "n_params": "parameters of the model",
    "epochs_completed": "epochs trained",
    "wall_time_s": "seconds of training (evaluation excluded)",
    "images_per_s": "training images per second",
    "curves": "{name: [one value per epoch]}, with wall_time_s, the seconds of training so far",
    "weights_sha256": "SHA-256 of weights.pt, or null when none was written (over the size limit)",
    "milestones": "{name: epoch}: halfway (the epoch of the halfway figures); where a schedule has them, "
                  "lr_decay_start (the first epoch trained below the base learning rate) and "
                  "kl_warmup_end (the first epoch trained at the full KL weight)",
    "figures": "{role: file stem in the run folder}, e.g. samples_halfway: samples_epoch020",
}
# A run writes those of these that its model has.
OPTIONAL = {
    "validation": "measures on the validation split (VAE: negative_elbo, nll_importance, importance_samples)",
    "test": "measures on the test split, made once at the end (VAE: as validation, at its own K; flow: bpd, "
            "bpd_importance_weighted, noise_samples)",
    "evaluation": "the sample measures of evaluation.evaluate_samples at the end",
    "evaluation_binary": "(VAE) the sample measures of binary samples x ~ p(x|z), where evaluation scores "
                         "the decoder means they are drawn from",
    "progress": "[{epoch, ...sample measures}] during training, against the selection reference (GAN)",
    "naive_mc": "the naive Monte-Carlo study of question 1.4 (VAE)",
    "data": "which data the run trained on, where there is a choice (VAE: binarized_mnist)",
    "interpolation_digits": "the digit pairs of the interpolation figure, with the classifier's "
                            "confidence (GAN)",
    "n_params_generator": "parameters of the generator alone (GAN)",
    "rebuilt": "set when --from_weights measured numbers that differ from the run's: command, git_commit, "
               "device_name, finished",
}
FIELDS = {**REQUIRED, **OPTIONAL}


class SchemaError(ValueError):
    """A metrics.json that is not of this schema."""


def check(metrics):
    """Raise SchemaError unless ``metrics`` has every required key and no undeclared one."""
    missing = REQUIRED.keys() - metrics.keys()
    unknown = metrics.keys() - FIELDS.keys()
    if missing or unknown:
        raise SchemaError(f"metrics.json of schema {SCHEMA_VERSION}: missing {sorted(missing)}, "
                          f"undeclared {sorted(unknown)}")
    if metrics["schema_version"] != SCHEMA_VERSION:
        raise SchemaError(f"metrics.json is of schema {metrics['schema_version']}, not {SCHEMA_VERSION}")


def dumps(metrics):
    return json.dumps(metrics, indent=2) + "\n"


def write(path, metrics):
    """Check ``metrics`` and write it to ``path`` atomically; returns the text written."""
    from harness.files import atomic_write
    check(metrics)
    text = dumps(metrics)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return text


def _path(path):
    path = Path(path)
    return path / "metrics.json" if path.is_dir() else path


def read(path):
    """The metrics of a run (its folder or its metrics.json), in the current schema."""
    path = _path(path)
    metrics = json.loads(path.read_text())
    try:
        check(metrics)
    except SchemaError as error:
        raise SchemaError(f"{path}: {error}") from None
    return metrics


def exists(path):
    return _path(path).exists()

