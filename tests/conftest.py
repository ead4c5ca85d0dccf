"""Shared fixtures: small, valid IDX files in torchvision's MNIST layout, the settings a run changes
process-wide (restored after every test), the marker of the tests that need bf16 hardware, and the
checks every script's smoke test makes (resume, rebuild from weights, one-line refusals)."""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import datasets.bmnist  # noqa: E402
import datasets.mnist  # noqa: E402
import datasets.raw  # noqa: E402
import evaluation  # noqa: E402
import harness  # noqa: E402
from harness.run import has_amx  # noqa: E402

N_FAKE_TRAIN, N_FAKE_TEST = 120, 30
# The tests of bf16 training matmuls: --precision auto picks bf16 only where has_amx(); on other
# CPUs oneDNN runs these matmuls in fp32 (AVX-512 BF16) or emulates bf16 (AVX2).
needs_amx = pytest.mark.skipif(
    not has_amx(),
    reason="this CPU has no AMX units (harness.run.has_amx() is False): oneDNN keeps the bf16 training "
           "matmuls in fp32 here, and no run trains in bf16")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test: results don't depend on the machine's core count, and tests run
    beside a training without fighting it for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def process_wide_settings():
    """``harness.Run`` flushes denormals and, inside ``matmul_precision()``, oneDNN sets its matmul
    precision: each test gets them back as they were."""
    matmul_precision = torch.backends.mkldnn.matmul.fp32_precision
    yield
    torch.backends.mkldnn.matmul.fp32_precision = matmul_precision
    torch.set_flush_denormal(False)


def write_idx(path, array):
    """Write a uint8 array as an IDX file: magic 0x0000 0x08 ndim, big-endian dims, then the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(header + array.tobytes())
    return path


def fake_mnist_arrays(seed=0):
    """Random images and labels with MNIST's shapes but few of them; every image holds a 0 and a 255,
    so value ranges have known extremes."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", N_FAKE_TRAIN), ("t10k", N_FAKE_TEST)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0], images[:, -1, -1] = 0, 255
        arrays[f"{prefix}-images-idx3-ubyte"] = images
        arrays[f"{prefix}-labels-idx1-ubyte"] = rng.integers(0, 10, size=n, dtype=np.uint8)
    return arrays


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """A small fake MNIST under ``tmp_path/MNIST/raw`` whose MD5s are the ones ``datasets.raw``
    expects for the duration of the test, so verification runs for real on these files; the
    original binarized-MNIST files cannot be downloaded.

    Returns a namespace: ``root``, ``arrays`` (name -> uint8 array) and ``md5`` (name -> digest).
    """
    arrays = fake_mnist_arrays()
    folder = datasets.raw.raw_dir(tmp_path)
    md5 = {name: datasets.raw.md5sum(write_idx(folder / name, arrays[name])) for name in datasets.raw.MD5}
    monkeypatch.setattr(datasets.raw, "MD5", md5)
    # The original binarized-MNIST files are out of reach (a closed port), so bmnist builds its
    # reproduction from these files whether or not this machine is online.
    monkeypatch.setattr(datasets.bmnist, "ORIGINAL_URL", "http://127.0.0.1:9/")
    return SimpleNamespace(root=tmp_path, arrays=arrays, md5=md5)


@pytest.fixture
def fake_mnist_root(fake_mnist):
    """Just the data root of ``fake_mnist``, for tests that only need valid data to exist."""
    return fake_mnist.root


@pytest.fixture
def small_splits(monkeypatch):
    """Split points scaled down to the fake data: 120 training images -> 80 / 40 (mnist), 90 / 30
    (bmnist); the evaluation's Parzen-width images are the last 40 and its selection reference 30 of
    the first 80."""
    monkeypatch.setattr(datasets.mnist, "N_TRAIN", 80)
    monkeypatch.setattr(datasets.mnist, "N_VAL", 40)
    monkeypatch.setattr(datasets.bmnist, "N_TRAIN", 90)
    monkeypatch.setattr(evaluation, "N_VALIDATION", 40)
    monkeypatch.setattr(evaluation, "N_REFERENCE", 30)


def corrupt(root, name="t10k-labels-idx1-ubyte"):
    """Flip one bit of an MNIST file under ``root``; returns its path."""
    path = datasets.raw.raw_dir(root) / name
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    return path


def assert_one_line_error(exit_info, *fragments):
    """A SystemExit from ``harness.cli``: one line, starting ``error: ``, holding ``fragments``."""
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def record_precision(module, seen):
    """Append (module.training, oneDNN's fp32 matmul precision) to ``seen`` at every forward pass."""
    module.register_forward_hook(lambda module, inputs, output: seen.append(
        (module.training, torch.backends.mkldnn.matmul.fp32_precision)))


def same_metrics(first, second):
    """Two metrics.json dicts agree on everything but the time they were written."""
    ignore = {"finished"}
    assert {k: v for k, v in first.items() if k not in ignore} == \
        {k: v for k, v in second.items() if k not in ignore}


def assert_resume_keeps_the_run(resume, out, metrics, capsys):
    """--resume of a finished run (``resume()`` runs it and returns its metrics) trains nothing: the
    checkpoint stays byte for byte the same, and the redrawn metrics equal ``metrics``."""
    checkpoint = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    same_metrics(resume(), metrics)
    assert "resumed from" in capsys.readouterr().out
    assert (out / "checkpoint.pt").read_bytes() == checkpoint


def assert_rebuild_reproduces_the_run(rebuild, out, metrics):
    """On a clean clone (metrics.json and weights.pt, no checkpoint), --from_weights (``rebuild()``
    runs it and returns its metrics) trains nothing, measures the run's numbers again, and leaves
    every file it redraws as it was: metrics.json, train.log and the PDF figures, byte for byte."""
    (out / "checkpoint.pt").unlink()
    kept = {path: path.read_bytes() for pattern in ("metrics.json", "train.log", "*.pdf")
            for path in out.glob(pattern)}
    rebuilt = rebuild()
    assert "rebuilt" not in rebuilt
    same_metrics(rebuilt, metrics)
    assert not (out / "checkpoint.pt").exists()
    assert {path: path.read_bytes() for path in kept} == kept


def assert_refused_in_one_line(main, *fragments):
    """``harness.cli(main)`` stops with one ``error:`` line holding ``fragments``."""
    with pytest.raises(SystemExit) as exit_info:
        harness.cli(main)
    return assert_one_line_error(exit_info, *fragments)
