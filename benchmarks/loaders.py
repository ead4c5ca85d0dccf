"""Images/s of our in-memory loaders against the course template's per-sample torchvision pipeline.

    python benchmarks/loaders.py [--data_root ./data/] [--seconds 5] [--batch_size 128]

Each loader is iterated, whole epochs one after another, until ``--seconds`` have passed; the time
to build it (reading and verifying the files) is reported separately. The template's way is
torchvision's MNIST dataset with per-sample PIL transforms (edge-pad, random translation,
centre-crop, to tensor, times 255, flatten) behind a shuffling DataLoader with two worker
processes, on the same 40,000 training images as our ``mnist`` training loader.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

# Run as a script from anywhere: the project's packages live one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.bmnist import bmnist  # noqa: E402
from datasets.mnist import N_TRAIN, mnist, mnist_gan  # noqa: E402
from harness import run as harness_run  # noqa: E402


def flatten_bytes(image):
    """The template's last step: ToTensor's [0, 1] back to 0..255, flattened to [784]."""
    return (image * 255).flatten()


def torchvision_loader(root, steps, batch_size, num_workers, n_images=None):
    """The templates' pipeline: torchvision's MNIST training images (all, or the first ``n_images``)
    through the per-sample transforms ``steps``, behind a shuffling DataLoader."""
    import torchvision
    from torchvision import transforms

    dataset = torchvision.datasets.MNIST(root, train=True, transform=transforms.Compose(steps),
                                         download=False)
    if n_images is not None:
        dataset = torch.utils.data.Subset(dataset, range(n_images))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers)


def template_loader(root, batch_size, num_workers):
    """The flow template's loader: edge-pad, random translation, centre-crop, 0..255, flattened."""
    from torchvision import transforms

    steps = [transforms.Pad(1, padding_mode="edge"), transforms.RandomAffine(0, translate=(0.05, 0.05)),
             transforms.CenterCrop(28), transforms.ToTensor(), flatten_bytes]
    return torchvision_loader(root, steps, batch_size, num_workers, N_TRAIN)


def template_with_workers(root, batch_size):
    """Two workers as the template intends; one process where worker processes cannot start."""
    try:
        loader = template_loader(root, batch_size, num_workers=2)
        next(iter(loader))
        return loader, "template: torchvision MNIST + PIL transforms, DataLoader 2 workers"
    except (RuntimeError, OSError) as error:
        print(f"DataLoader with 2 workers failed ({error}); measuring with num_workers=0")
        return (template_loader(root, batch_size, num_workers=0),
                "template: torchvision MNIST + PIL transforms, DataLoader no workers")


def images_per_second(loader, seconds):
    """Iterate whole epochs until ``seconds`` have passed (stopping mid-epoch if need be)."""
    images, start = 0, time.perf_counter()
    while True:
        for batch in loader:
            images += len(batch[0] if isinstance(batch, (tuple, list)) else batch)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return images / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", type=harness_run.existing_dir, default=harness_run.DEFAULT_DATA_ROOT,
                        help="folder holding MNIST/raw")
    parser.add_argument("--seconds", type=harness_run.positive_float, default=5.0,
                        help="how long to iterate each loader")
    parser.add_argument("--batch_size", type=harness_run.positive_int, default=128)
    args = parser.parse_args()
    root, batch = args.data_root, args.batch_size
    harness_run.seed_everything(0)

    candidates = [
        ("mnist train (random translation)", lambda: mnist(root, batch)[0]),
        ("bmnist train, static binarization", lambda: bmnist(root, batch)[0]),
        ("bmnist train, dynamic binarization", lambda: bmnist(root, batch, dynamic=True)[0]),
        ("mnist_gan ([-1, 1] images)", lambda: mnist_gan(root, batch)),
    ]
    print(f"batch size {batch}, {args.seconds:g} s per loader, torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads")
    rows = []
    start = time.perf_counter()
    template, template_name = template_with_workers(root, batch)
    rows.append((template_name, time.perf_counter() - start, images_per_second(template, args.seconds)))
    del template
    for name, build in candidates:
        start = time.perf_counter()
        loader = build()
        rows.append((name, time.perf_counter() - start, images_per_second(loader, args.seconds)))

    baseline = rows[0][2]
    width = max(len(name) for name, _, _ in rows)
    print(f"{'loader':<{width}}  {'setup s':>7}  {'images/s':>10}  {'vs template':>11}")
    for name, setup, rate in rows:
        print(f"{name:<{width}}  {setup:7.2f}  {rate:10,.0f}  {rate / baseline:10.1f}x")


if __name__ == "__main__":
    main()
