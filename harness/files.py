"""Files a run writes and reads: atomic writes, the code's commit, weights-only files checked by their
SHA-256, and the checkpoint dict."""

import hashlib
import io
import json
import os
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# What a run executes: a change here makes a run's recorded commit "-dirty".
CODE = ["a3_*.py", "harness", "extensions", "datasets", "evaluation", "requirements.txt"]
# Weights files up to this size are committed with the run; larger ones are not written, and only a
# checkpoint or retraining brings such a run back.
WEIGHTS_LIMIT = 10 * 2**20


class RunError(RuntimeError):
    """A run cannot go on for a reason the user can fix (NaN loss, a checkpoint of other settings)."""


def atomic_write(path, write):
    """Run ``write(tmp_path)`` then rename over ``path``: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_text_if_changed(path, text):
    """Write ``text`` to ``path`` unless the file already holds exactly it (keeps a clean tree clean);
    returns whether it wrote."""
    path = Path(path)
    if path.exists() and path.read_text() == text:
        return False
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return True


def write_json(path, obj):
    """``obj`` as indented JSON in ``path``, left untouched when it already holds exactly that."""
    return write_text_if_changed(path, json.dumps(obj, indent=2) + "\n")


def git_commit():
    """The commit of the code, with ``-dirty`` when the code a run executes differs from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *CODE], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def sha256(data):
    return hashlib.sha256(data).hexdigest()


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
    """``torch.load(path, weights_only=True)`` once the file's SHA-256 is ``expected_sha256``; a
    missing, corrupted or other file is a RunError saying so."""
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
    if not isinstance(payload, dict) or not {"settings", "seed", "state", "epoch"} <= payload.keys():
        raise RunError(f"{path} is not a checkpoint of this code: delete it, or point --out elsewhere")
    return payload
