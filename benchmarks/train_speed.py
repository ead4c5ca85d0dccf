"""Training speed: the course template's way against this project's, the machine's matmul throughput,
and how long each default training run took to reach its quality bar.

    python benchmarks/train_speed.py [--out results/] [--results results/] [--quick]

Each model trains for a fixed number of steps at its default batch size (VAE 128, GAN 128, flow 256),
timed end to end with data loading, after warm-up steps that also start the DataLoader's workers:

- the template's way: torchvision's MNIST with per-sample PIL transforms behind a shuffling DataLoader
  with two worker processes, plain Adam (not fused), and ``loss.item()`` after every batch;
- our way: the in-memory loaders of ``datasets``, the optimizers the scripts build, and the scripts'
  own training functions, which keep running statistics on the device.

Both ways train the same architecture from the same seed, with torch's default thread settings. The
achieved GFLOP/s counts the Linear layers only (they are nearly all of the arithmetic): per layer call
on N rows, 2 N in out for the forward pass, the same again for the weight gradient, and the same again
for the input gradient when the layer's input needs one. That is 3x the forward FLOPs, except for a
first layer fed with data or noise (2x). The layers are counted as they run, over the first
``FLOP_COUNT_STEPS`` steps, so the GAN's step includes G once, D on its fakes twice (generator and
discriminator steps) and D on real images once. The template's generator step also computes the
discriminator's weight gradients and then discards them; ours freezes D for that step and skips
them. Ours scores real and fake images in one pass of D for its own step. On the steps that carry
our R1 penalty (one in ``--r1_interval``) real images need an input gradient, which that pass then
computes for the fakes as well, so D's first layer counts 3x on both; the penalty's double backward
is not counted. The fraction is taken of the fastest of the square fp32 ``torch.mm`` timed in the same
process, 20 before each model and 20 at the end.

The wall time to each quality bar is read from the runs' ``metrics.json`` under ``--results``.
Everything lands in ``<out>/benchmark.md`` and ``<out>/benchmark.json``, with the machine's facts.
"""

import argparse
import copy
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

# Run as a script from anywhere: the project's packages live one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import a3_gan_template as gan  # noqa: E402
import a3_nf_template as nf  # noqa: E402
import a3_vae_template as vae  # noqa: E402
import common  # noqa: E402
from benchmarks import loaders  # noqa: E402
from datasets.bmnist import N_TRAIN as BMNIST_TRAIN  # noqa: E402
from datasets.bmnist import bmnist  # noqa: E402
from datasets.mnist import mnist, mnist_gan  # noqa: E402

TEMPLATE_WORKERS = 2
# (warm-up steps, timed steps) per model and round: about two minutes in all on two cores. Each round
# builds its loaders afresh, and the FLOP-counting, warm-up and timed steps fit in one epoch of the
# template's loaders, so their workers start once per round, before the timing.
STEPS = {"vae": (10, 100), "gan": (20, 200), "nf": (3, 15)}
QUICK_STEPS = {"vae": (1, 3), "gan": (1, 3), "nf": (1, 2)}
# The two ways alternate over rounds and each reports its median round: this machine's speed drifts by
# tens of percent over minutes, which would otherwise land on whichever way ran in a slow stretch. With
# 3 rounds, three runs of the same VAE code measured speed-ups from 2.9x to 3.3x.
ROUNDS, QUICK_ROUNDS = 5, 2
FLOP_COUNT_STEPS = 8  # a whole period of the GAN's lazy R1 penalty (its default --r1_interval)
GEMM_SIZE, GEMM_REPS = 2048, 20
QUICK_GEMM_SIZE, QUICK_GEMM_REPS = 256, 3

VAE_BAR, NF_BAR, GAN_BAR = 100.0, 1.85, 9.0
GOAL_SPEEDUP = 3.0
GOAL_MATMUL_FRACTION = 0.75
GOAL_NF_SECONDS = 15 * 60
GOAL_RESULTS_SECONDS = 2 * 60 * 60
RUNS = ("vae", "vae_z2", "gan", "nf")  # what `make results` trains


# ---------------------------------------------------------------- batches

def endless(loader):
    """Batches from ``loader``, epoch after epoch."""
    while True:
        yield from loader


class Batches:
    """The next ``n`` batches of an endless stream, shaped like a loader of ``n`` batches (``len`` and
    all), so that the scripts' epoch functions train on them. Counts the images it hands out."""

    def __init__(self, stream, n):
        self.stream = stream
        self.n = n
        self.images = 0

    def __len__(self):
        return self.n

    def __iter__(self):
        for batch in itertools.islice(self.stream, self.n):
            self.images += len(batch[0] if isinstance(batch, (tuple, list)) else batch)
            yield batch


def binarize_image(image):
    """Per-sample dynamic binarization, as a torchvision transform: bits ~ Bernoulli(intensity)."""
    return torch.bernoulli(image)


def torchvision_mnist(root, transform, batch_size, num_workers, n_images=None):
    """The template's pipeline: torchvision's MNIST training images (all, or the first ``n_images``),
    each through ``transform``, in shuffled batches."""
    dataset = torchvision.datasets.MNIST(root, train=True, transform=transform, download=False)
    if n_images is not None:
        dataset = Subset(dataset, range(min(n_images, len(dataset))))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers)


def template_stream(build):
    """An endless stream from ``build(num_workers)``, the template's DataLoader, with two workers; with
    none where worker processes cannot start here. Returns (stream, workers used)."""
    try:
        stream = endless(build(TEMPLATE_WORKERS))
        next(stream)
        return stream, TEMPLATE_WORKERS
    except (RuntimeError, OSError) as error:
        print(f"DataLoader with {TEMPLATE_WORKERS} workers failed ({error}); measuring without workers")
        return endless(build(0)), 0


# ---------------------------------------------------------------- the two ways, per model

class Way:
    """One way of training one model: its modules, its stream of batches of ``batch_size`` images and
    ``train(batches)``; ``workers`` is the number of DataLoader worker processes behind the stream and
    ``precision`` that of the training matmuls."""

    def __init__(self, modules, batch_size, stream, train, workers=0, precision="fp32"):
        self.precision = precision
        self.modules = modules
        self.batch_size = batch_size
        self.stream = stream
        self.train = train
        self.workers = workers


def template_vae_steps(model, optimizer, batches):
    """The template's loop: the batch's mean negative ELBO, a step, and the loss read back every batch."""
    model.train()
    losses = []
    for images, _ in batches:
        loss = model(images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def template_gan_steps(generator, discriminator, optimizer_G, optimizer_D, batches):
    """The template's loop: a generator step, then a discriminator step on the same fakes, and both
    losses read back every batch. Returns [(loss_d, loss_g)] per batch."""
    generator.train()
    discriminator.train()
    losses = []
    for images, _ in batches:
        real = images.reshape(len(images), -1)
        z = torch.randn(len(real), generator.latent_dim)
        gen_imgs = generator(z)
        loss_g = gan.generator_loss(discriminator.logits(gen_imgs))
        optimizer_G.zero_grad()
        loss_g.backward()
        optimizer_G.step()
        loss_d = gan.discriminator_loss(discriminator.logits(real), discriminator.logits(gen_imgs.detach()))
        optimizer_D.zero_grad()
        loss_d.backward()
        optimizer_D.step()
        losses.append((loss_d.item(), loss_g.item()))
    return losses


def template_nf_steps(model, optimizer, batches):
    """The template's loop: the batch's mean bits per dimension, a step, the loss read back every batch."""
    model.train()
    losses = []
    for images, _ in batches:
        loss = nf.bits_per_dim(model(images)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def vae_way(way, root, seed):
    """The VAE of a3_vae_template at its defaults, trained the template's way or ours."""
    args = vae.parse_args([])
    common.seed_everything(seed)
    model = vae.VAE(args.hidden_dim, args.zdim)
    if way == "template":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        transform = transforms.Compose([transforms.ToTensor(), binarize_image])
        stream, workers = template_stream(
            lambda w: torchvision_mnist(root, transform, args.batch_size, w, n_images=BMNIST_TRAIN))
        return Way([model], args.batch_size, stream, lambda b: template_vae_steps(model, optimizer, b),
                   workers)

    optimizer = vae.make_optimizer(model, args)
    precision = common.training_precision(args.precision, torch.device("cpu"))

    def train(batches):
        model.train()
        return vae.epoch_iter(model, batches, optimizer, precision=precision)

    return Way([model], args.batch_size, endless(bmnist(root, args.batch_size, dynamic=True)[0]), train,
               precision=precision)


def gan_way(way, root, seed):
    """The GAN of a3_gan_template at its defaults, trained the template's way or ours."""
    args = gan.parse_args([])
    common.seed_everything(seed)
    generator, discriminator = gan.Generator(args.latent_dim), gan.Discriminator()
    if way == "template":
        optimizer_G, optimizer_D = (torch.optim.Adam(m.parameters(), lr=args.lr, betas=(0.5, 0.999))
                                    for m in (generator, discriminator))
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
        stream, workers = template_stream(lambda w: torchvision_mnist(root, transform, args.batch_size, w))
        precision = "fp32"

        def train(batches):
            return template_gan_steps(generator, discriminator, optimizer_G, optimizer_D, batches)
    else:
        stream, workers = endless(mnist_gan(root, args.batch_size)), 0
        optimizer_G, optimizer_D = gan.make_optimizers(generator, discriminator, args)
        average = copy.deepcopy(generator) if args.ema > 0 else None  # as main() keeps it
        options = gan.training_options(args, torch.device("cpu"))
        precision = options["precision"]

        def train(batches):
            return gan.train(batches, discriminator, generator, optimizer_G, optimizer_D, average=average,
                             **options)

    return Way([generator, discriminator], args.batch_size, stream, train, workers, precision)


def nf_way(way, root, seed):
    """The flow of a3_nf_template at its defaults, trained the template's way or ours."""
    args = nf.parse_args([])
    common.seed_everything(seed)
    model = nf.Model([nf.N_PIXELS])
    if way == "template":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        stream, workers = template_stream(lambda w: loaders.template_loader(root, args.batch_size, w))
        return Way([model], args.batch_size, stream, lambda b: template_nf_steps(model, optimizer, b),
                   workers)
    traindata = mnist(root, args.batch_size)[0]
    optimizer = nf.make_optimizer(model, args)
    scheduler = nf.make_scheduler(optimizer, len(traindata), args)
    precision = common.training_precision(args.precision, torch.device("cpu"))

    def train(batches):
        model.train()
        return nf.epoch_iter(model, batches, optimizer, scheduler, args.clip, precision=precision)

    return Way([model], args.batch_size, endless(traindata), train, precision=precision)


MODELS = {"vae": ("VAE", vae_way), "gan": ("GAN", gan_way), "nf": ("flow", nf_way)}


# ---------------------------------------------------------------- measuring

def count_linear_flops(modules, step):
    """FLOPs of the Linear layers of ``modules`` while ``step()`` runs (forward and backward; see the
    module's docstring for the rule)."""
    total = 0

    def hook(layer, inputs, output):
        nonlocal total
        x = inputs[0]
        forward = 2 * (x.numel() // layer.in_features) * layer.in_features * layer.out_features
        passes = 1
        if torch.is_grad_enabled():
            passes += layer.weight.requires_grad + x.requires_grad
        total += forward * passes

    handles = [layer.register_forward_hook(hook)
               for module in modules for layer in module.modules() if isinstance(layer, torch.nn.Linear)]
    try:
        step()
    finally:
        for handle in handles:
            handle.remove()
    return total


def measure_way(way, warmup, steps):
    """Images/s over ``steps`` timed training steps after ``FLOP_COUNT_STEPS`` untimed ones, which
    count the Linear FLOPs per image, and ``warmup`` more untimed ones."""
    first = Batches(way.stream, FLOP_COUNT_STEPS)
    flops = count_linear_flops(way.modules, lambda: way.train(first))
    if warmup > 0:
        way.train(Batches(way.stream, warmup))
    timed = Batches(way.stream, steps)
    start = time.perf_counter()
    way.train(timed)
    seconds = time.perf_counter() - start
    way.stream.close()  # stops the DataLoader's workers before the next measurement
    return {"steps": steps, "images": timed.images, "seconds": seconds,
            "images_per_s": timed.images / seconds, "linear_flops_per_image": flops / first.images,
            "batch_size": way.batch_size, "workers": way.workers, "precision": way.precision}


def matmul_gflops(size, reps, dtype=torch.float32):
    """GFLOP/s of a square ``torch.mm`` (2 size^3 FLOPs) in ``dtype``, median and best of ``reps``
    timings, and the rate of every timing."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(dtype) for _ in range(2))
    c = torch.mm(a, b)  # warm-up: thread pool and caches
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b, out=c)
        times.append(time.perf_counter() - start)
    flops = 2 * size**3
    return {"size": size, "reps": reps, "dtype": str(dtype).removeprefix("torch."),
            "gflops_median": flops / statistics.median(times) / 1e9, "gflops_best": flops / min(times) / 1e9,
            "gflops": [flops / t / 1e9 for t in times]}


def merge_matmul(measurements):
    """One measurement of the GEMM from several taken at different times of the run: its best is the
    best repetition of all of them, as this machine's speed drifts by tens of percent over minutes."""
    rates = [rate for measurement in measurements for rate in measurement["gflops"]]
    return {**measurements[0], "reps": len(rates), "measurements": len(measurements),
            "gflops_median": statistics.median(rates), "gflops_best": max(rates),
            "gflops_best_per_measurement": [m["gflops_best"] for m in measurements], "gflops": rates}


def cpu_model_and_cores():
    """(CPU model name, physical cores) from /proc/cpuinfo where there is one."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), None
    model, cores = None, set()
    for block in text.split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        model = model or fields.get("model name")
        if "core id" in fields:
            cores.add((fields.get("physical id"), fields["core id"]))
    return model or platform.processor() or platform.machine(), len(cores) or None


def machine_facts():
    cpu_model, physical_cores = cpu_model_and_cores()
    return {
        "cpu_model": cpu_model,
        "logical_cores": os.cpu_count(),
        "physical_cores": physical_cores,
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


# ---------------------------------------------------------------- time to the quality bars

def read_metrics(results, run):
    path = Path(results) / run / "metrics.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def first_reached(points, reached):
    """(epoch, seconds, value) of the first (epoch, seconds, value) point whose value passes ``reached``."""
    return next(((e, s, v) for e, s, v in points if reached(v)), None)


def quality_bar(model, bar, points, reached, best, device=None):
    """A row of the time-to-bar table from the run's curve as (epoch, cumulative seconds, value) points;
    no points means no run (or one that did not record the curve). ``device`` is where the run trained:
    its seconds are only this machine's when it is the CPU."""
    row = {"model": model, "bar": bar, "status": "no run", "epoch": None, "seconds": None, "best": None,
           "device": device}
    if not points:
        return row
    row["best"] = best(value for _, _, value in points)
    hit = first_reached(points, reached)
    if hit is None:
        row["status"] = "not reached"
    else:
        row["status"] = "reached"
        row["epoch"], row["seconds"], _ = hit
    return row


def quality_bars(results):
    """Wall time each default run needed to reach its bar, from its curves (cumulative training seconds
    at the end of each epoch)."""
    rows = []
    metrics = read_metrics(results, "vae")
    curves = (metrics or {}).get("curves", {})
    # Index 0 of the VAE's curves is the untrained model, at 0 s.
    points = list(zip(itertools.count(0), curves.get("wall_time_s", []), curves.get("val_negative_elbo", [])))
    rows.append(quality_bar("VAE", f"validation negative ELBO <= {VAE_BAR:g} nats (validation proxy "
                                   "for the test bar)", points, lambda v: v <= VAE_BAR, min,
                            (metrics or {}).get("device")))
    metrics = read_metrics(results, "nf")
    curves = (metrics or {}).get("curves", {})
    points = list(zip(itertools.count(1), curves.get("wall_time_s", []), curves.get("val_bpd", [])))
    rows.append(quality_bar("flow", f"validation bpd < {NF_BAR:g}", points, lambda v: v < NF_BAR, min,
                            (metrics or {}).get("device")))
    metrics = read_metrics(results, "gan")
    times = (metrics or {}).get("curves", {}).get("wall_time_s", [])
    progress = sorted((metrics or {}).get("progress", []), key=lambda entry: entry["epoch"])
    points = [(entry["epoch"], times[entry["epoch"] - 1], entry["score"]) for entry in progress
              if entry["epoch"] <= len(times)]
    rows.append(quality_bar("GAN", f"classifier score >= {GAN_BAR:g} (scored at the progress epochs only)",
                            points, lambda v: v >= GAN_BAR, max, (metrics or {}).get("device")))
    return rows


def training_seconds(results):
    """Training seconds recorded by each of `make results`' runs (None where a run has no metrics)."""
    return {run: (read_metrics(results, run) or {}).get("wall_time_s") for run in RUNS}


def training_devices(results):
    """Where each of `make results`' runs trained (None where a run has no metrics)."""
    return {run: (read_metrics(results, run) or {}).get("device") for run in RUNS}


def on_cpu(device):
    return device in (None, "cpu")


# ---------------------------------------------------------------- report

def goals(report):
    """Each goal of the issue: the measured value and whether it is met (None: nothing to judge by)."""
    models, bars = report["models"], {row["model"]: row for row in report["quality_bars"]}
    flow_bar = bars["flow"]
    seconds = report["training_seconds"]
    total = sum(seconds.values()) if None not in seconds.values() else None
    elsewhere = [run for run, device in report["training_devices"].items() if not on_cpu(device)]
    return [
        {"goal": f"VAE end-to-end throughput >= {GOAL_SPEEDUP:g}x the template's",
         "value": f"{models['vae']['speedup']:.2f}x", "met": models["vae"]["speedup"] >= GOAL_SPEEDUP},
        {"goal": f"GAN end-to-end throughput >= {GOAL_SPEEDUP:g}x the template's",
         "value": f"{models['gan']['speedup']:.2f}x", "met": models["gan"]["speedup"] >= GOAL_SPEEDUP},
        {"goal": f"flow training step >= {GOAL_MATMUL_FRACTION:.0%} of matmul throughput",
         "value": f"{models['nf']['ours']['matmul_fraction']:.0%}" + (
             f" (bf16 matmuls: {models['nf']['ours']['gflops'] / report['matmul_bf16']['gflops_best']:.0%}"
             " of the bf16 rate)" if models["nf"]["ours"]["precision"] == "bf16" else ""),
         "met": models["nf"]["ours"]["matmul_fraction"] >= GOAL_MATMUL_FRACTION},
        {"goal": f"flow below {NF_BAR:g} validation bpd in <= {GOAL_NF_SECONDS // 60} min",
         "value": _bar_value(flow_bar),
         "met": None if flow_bar["status"] == "no run" or not on_cpu(flow_bar["device"]) else
         flow_bar["status"] == "reached" and flow_bar["seconds"] <= GOAL_NF_SECONDS},
        {"goal": f"make results <= {GOAL_RESULTS_SECONDS // 3600} h (training time only; evaluation "
                 "and figures come on top)",
         "value": "runs missing" if total is None else
         f"{total / 60:.0f} min" + (f" (not all on this CPU: {', '.join(elsewhere)})" if elsewhere else ""),
         "met": None if total is None or elsewhere else total <= GOAL_RESULTS_SECONDS},
    ]


def _bar_value(row):
    if row["status"] == "reached":
        where = "" if on_cpu(row.get("device")) else f", on {row['device']}, not this CPU"
        return f"{row['seconds'] / 60:.1f} min (epoch {row['epoch']}{where})"
    if row["status"] == "not reached":
        return f"not reached (best {row['best']:.4g})"
    return "no run"


def _met(value):
    return {True: "met", False: "NOT met", None: "not judged"}[value]


def markdown(report):
    machine, gemm = report["machine"], report["matmul"]
    lines = [
        "# Training speed",
        "",
        f"`{report['run']['command']}` at {report['run']['started']}, commit {report['run']['git_commit']}.",
        "",
        "## Machine",
        "",
        "| fact | value |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in machine.items()),
        "",
        f"fp32 matmul ({gemm['size']}x{gemm['size']}, best of {gemm['reps']} in {gemm['measurements']} "
        f"measurements, before each model and at the end: "
        + ", ".join(f"{best:.1f}" for best in gemm["gflops_best_per_measurement"]) + "): "
        f"**{gemm['gflops_best']:.1f} GFLOP/s** (median {gemm['gflops_median']:.1f}); the same in bf16: "
        f"{report['matmul_bf16']['gflops_best']:.1f} GFLOP/s. The best repetition is the machine's rate, as "
        "noise only ever slows one down. The goal's fraction is of the fp32 rate; "
        "a model whose training matmuls run in bf16 (column precision) can exceed what fp32 could reach.",
        "",
        "## Training throughput, end to end with data loading",
        "",
        "Template: torchvision MNIST + per-sample PIL transforms, DataLoader with workers, plain Adam, "
        "`.item()` every batch. Ours: in-memory loaders, the scripts' optimizers and training functions. "
        "GFLOP/s counts Linear layers, forward and backward (3x forward; 2x for a first layer fed data "
        "or noise).",
        "",
        "Each way's img/s is its median over rounds that alternate the two ways (every round is in "
        "benchmark.json).",
        "",
        "| model | batch | steps x rounds | template img/s | ours img/s | speed-up | Linear MFLOP/image "
        "| template GFLOP/s | ours GFLOP/s | ours precision | ours of fp32 matmul |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["models"].values():
        template, ours = row["template"], row["ours"]
        lines.append(
            f"| {row['name']} | {ours['batch_size']} | {ours['steps']} x {len(ours['rounds_images_per_s'])} "
            f"| {template['images_per_s']:,.0f} "
            f"| {ours['images_per_s']:,.0f} | {row['speedup']:.2f}x "
            f"| {ours['linear_flops_per_image'] / 1e6:.1f} | {template['gflops']:.1f} "
            f"| {ours['gflops']:.1f} | {ours['precision']} | {ours['matmul_fraction']:.0%} |")
    lines += [
        "",
        "## Wall time to the quality bar (from the runs' metrics.json, training seconds)",
        "",
        "| model | bar | time |",
        "|---|---|---|",
        *(f"| {row['model']} | {row['bar']} | {_bar_value(row)} |" for row in report["quality_bars"]),
        "",
        "## Goals",
        "",
        "| goal | measured | |",
        "|---|---|---|",
        *(f"| {goal['goal']} | {goal['value']} | {_met(goal['met'])} |" for goal in report["goals"]),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=common.existing_dir, default=common.DEFAULT_DATA_ROOT,
                        help="folder holding MNIST/raw")
    parser.add_argument("--out", default="results", help="folder for benchmark.md and benchmark.json")
    parser.add_argument("--results", default="results",
                        help="folder holding the training runs' <run>/metrics.json")
    parser.add_argument("--quick", action="store_true",
                        help="a handful of steps: a smoke run, not a measurement")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    steps = QUICK_STEPS if args.quick else STEPS
    gemm = (QUICK_GEMM_SIZE, QUICK_GEMM_REPS) if args.quick else (GEMM_SIZE, GEMM_REPS)
    report = {"run": common.run_info(args, "cpu"), "machine": machine_facts(),
              "matmul_bf16": matmul_gflops(*gemm, torch.bfloat16), "models": {}}
    print(f"bf16 matmul: {report['matmul_bf16']['gflops_best']:.1f} GFLOP/s", flush=True)
    gemms = []  # fp32, measured before each model and at the end
    rounds = QUICK_ROUNDS if args.quick else ROUNDS
    for key, (name, build) in MODELS.items():
        gemms.append(matmul_gflops(*gemm))
        print(f"fp32 matmul: {gemms[-1]['gflops_best']:.1f} GFLOP/s", flush=True)
        warmup, timed = steps[key]
        row = {"name": name}
        measured = {"template": [], "ours": []}
        for _ in range(rounds):
            for way, results in measured.items():
                results.append(measure_way(build(way, args.data_root, args.seed), warmup, timed))
                print(f"{name} {way}: {results[-1]['images_per_s']:,.0f} images/s", flush=True)
        for way, results in measured.items():
            result = sorted(results, key=lambda r: r["images_per_s"])[(len(results) - 1) // 2]
            result["rounds_images_per_s"] = [r["images_per_s"] for r in results]
            result["gflops"] = result["linear_flops_per_image"] * result["images_per_s"] / 1e9
            row[way] = result
        row["speedup"] = row["ours"]["images_per_s"] / row["template"]["images_per_s"]
        report["models"][key] = row
    gemms.append(matmul_gflops(*gemm))
    report["matmul"] = merge_matmul(gemms)
    peak = report["matmul"]["gflops_best"]
    print(f"fp32 matmul: {gemms[-1]['gflops_best']:.1f} GFLOP/s; best of the run {peak:.1f}", flush=True)
    for row in report["models"].values():
        for way in ("template", "ours"):
            row[way]["matmul_fraction"] = row[way]["gflops"] / peak
    report["quality_bars"] = quality_bars(args.results)
    report["training_seconds"] = training_seconds(args.results)
    report["training_devices"] = training_devices(args.results)
    report["goals"] = goals(report)

    out = Path(args.out)
    text = markdown(report)
    common.write_json(out / "benchmark.json", report)
    common.atomic_write(out / "benchmark.md", lambda tmp: Path(tmp).write_text(text))
    print(text)
    print(f"wrote {out / 'benchmark.md'} and {out / 'benchmark.json'}")
    return report


if __name__ == "__main__":
    main()
