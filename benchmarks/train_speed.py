"""Training speed of each model, the course template's way and ours side by side in one run.

    python benchmarks/train_speed.py [--steps N] [--rounds 3] [--out results]

Each way trains for a fixed number of steps, timed end to end with data loading after warm-up steps,
in rounds that alternate the ways (a machine's speed drifts over minutes); each way reports its
median images/s, and ours its ratio to the template's.

- The template's way: torchvision's MNIST (<data_root>/MNIST/raw) with per-sample transforms behind a
  shuffling DataLoader with 2 worker processes (VAE: ToTensor and a Bernoulli draw, standing in for
  the template's per-sample read of its binarized images; GAN: ToTensor and Normalize; flow:
  ``loaders.template_loader``), plain Adam, fp32, ``loss.item()`` every batch, and the template's
  networks, batch sizes and learning rates: the VAE with one hidden layer; the GAN at batch 64, whose
  generator step also computes D's weight gradients and whose D step runs D twice, on real and on
  fake images; the flow at batch 128.
- Ours: the scripts' training functions (``vae.epoch_iter``, ``gan.train``, ``nf.epoch_iter``) on
  the in-memory loaders of ``datasets`` with each script's ``DEFAULT`` settings (networks, batch sizes,
  R1 and weight average, clipping, schedules), fused Adam, and the precision ``--precision auto``
  picks, entered with ``harness.matmul_precision`` as in training. When that is bf16, ours also runs
  in fp32 (column "ours fp32"): the ratio is what bf16 gains on this CPU.

Precision, one mechanism, decided by measurement: oneDNN may compute fp32 matmuls with their inputs
rounded to bf16 (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``). On an Intel Xeon with
AMX units that ran a 2048^2 ``torch.mm`` about 6x as fast as fp32; on an AMD EPYC with AVX-512
BF16 but no AMX, oneDNN kept fp32 kernels in that mode (its results deviated from fp32 by 1e-6, not
the 1e-3 of bf16 rounding), so it rounds nothing there; on an AVX2 CPU it emulates bf16 at about
1 GFLOP/s. So ``auto`` is bf16 only with AMX
(``harness.run.has_amx``). The matmul rows give this CPU's rate of square ``torch.mm`` in fp32 and in
the bf16 mode, and the mode's deviation from fp32, which shows whether it rounds at all; the mode is
not timed on CPUs with neither AMX nor AVX-512 BF16.

Results and the machine's facts go to <out>/benchmark.md and <out>/benchmark.json.
"""

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision import transforms

# Run as a script from anywhere: the project's packages live one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import a3_gan_template as gan  # noqa: E402
import a3_nf_template as nf  # noqa: E402
import a3_vae_template as vae  # noqa: E402
from benchmarks.loaders import template_loader, torchvision_loader  # noqa: E402
from datasets import bmnist, mnist  # noqa: E402
from harness import matmul_precision  # noqa: E402
from harness import run as harness_run  # noqa: E402
from harness.files import atomic_write, write_json  # noqa: E402

STEPS = {"vae": 200, "gan": 160, "nf": 20}  # timed steps per round: 30-60 s per model on two cores
WARMUP = 5  # untimed steps before each timing; they also use up what the template's workers prefetched
WORKERS = 2
MATMUL_SIZES, MATMUL_REPS = (512, 1024), 10
BF16_FAST = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
SKIPPED = ("bf16 mode not timed: this CPU has neither AMX nor AVX-512 BF16, so oneDNN would emulate bf16 "
           "(about 1 GFLOP/s on an AVX2 CPU).")
NO_AMX = "Without AMX units the scripts train in fp32 (`--precision auto`), so ours is timed in fp32."


def endless(loader):
    while True:
        yield from loader


class Batches:
    """The next ``n`` batches of a stream, with a ``len``, as the scripts' epoch functions take them."""

    def __init__(self, stream, n):
        self.stream, self.n, self.images = stream, n, 0

    def __len__(self):
        return self.n

    def __iter__(self):
        for batch in itertools.islice(self.stream, self.n):
            self.images += len(batch[0] if isinstance(batch, tuple | list) else batch)
            yield batch


def template_loop(step):
    """The template's loop: ``step(images)`` per batch, each loss it returns read back by ``.item()``."""
    def train(batches):
        for images, _ in batches:
            for loss in step(images):
                loss.item()
    return train


def adam_step(optimizer, loss):
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def vae_ways(root):
    """((batch size, loader, train(batches)) of the template's way, the same of ours)."""
    template, s = vae.TEMPLATE, vae.DEFAULT
    model = vae.VAE.from_settings(template)
    optimizer = torch.optim.Adam(model.parameters(), lr=template.lr)
    loader = torchvision_loader(root, [transforms.ToTensor(), torch.bernoulli], template.batch_size, WORKERS,
                                bmnist.N_TRAIN)
    ours = vae.VAE.from_settings(s)
    ours_optimizer = torch.optim.Adam(ours.parameters(), lr=s.lr, fused=True)
    train = bmnist.bmnist(root, s.batch_size, dynamic=s.dynamic_binarization)[0]

    def ours_train(batches):
        ours.train()
        vae.epoch_iter(ours, batches, ours_optimizer, s)
    return ((template.batch_size, loader, template_loop(lambda x: [adam_step(optimizer, model(x))])),
            (s.batch_size, train, ours_train))


def gan_networks(settings, fused):
    g, d = gan.Generator(settings.latent_dim), gan.Discriminator()
    return g, d, *(torch.optim.Adam(net.parameters(), lr=settings.lr, fused=fused,
                                    betas=(settings.adam_beta1, settings.adam_beta2)) for net in (g, d))


def gan_ways(root):
    g, d, opt_g, opt_d = gan_networks(gan.TEMPLATE, fused=False)

    def step(images):
        real = images.reshape(len(images), 784)
        fake = g(torch.randn(len(real), g.latent_dim))
        loss_g = adam_step(opt_g, gan.generator_loss(d.logits(fake)))  # fills D's .grad too, unused
        return [loss_g, adam_step(opt_d, gan.discriminator_loss(d.logits(real), d.logits(fake.detach())))]

    batch, s = gan.TEMPLATE.batch_size, gan.DEFAULT
    loader = torchvision_loader(root, [transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))], batch,
                                WORKERS)
    og, od, ours_g, ours_d = gan_networks(s, fused=True)
    average = gan.weight_average(og, s.ema_decay)  # the weight average main() keeps
    train = lambda b: gan.train(b, od, og, ours_g, ours_d, settings=s, average=average)
    return (batch, loader, template_loop(step)), (s.batch_size, mnist.mnist_gan(root, s.batch_size), train)


def nf_ways(root):
    model, batch, s = nf.Model([nf.N_PIXELS]), nf.TEMPLATE.batch_size, nf.DEFAULT
    optimizer = torch.optim.Adam(model.parameters(), lr=nf.TEMPLATE.lr)
    step = lambda x: [adam_step(optimizer, nf.bits_per_dim(model(x)).mean())]
    ours = nf.Model([nf.N_PIXELS])
    ours_optimizer = torch.optim.Adam(ours.parameters(), lr=s.lr, fused=True)
    train = mnist.mnist(root, s.batch_size)[0]
    return ((batch, template_loader(root, batch, WORKERS), template_loop(step)),
            (s.batch_size, train, lambda b: nf.epoch_iter(ours, b, ours_optimizer, s)))


MODELS = {"vae": ("VAE", vae_ways), "gan": ("GAN", gan_ways), "nf": ("flow", nf_ways)}


def measure_model(build, root, steps, rounds, auto):
    """Images/s per round of each column: template (fp32), ours (``auto``) and, if bf16, ours in fp32."""
    (t_batch, t_loader, t_train), (o_batch, o_loader, o_train) = build(root)
    t_stream, o_stream = endless(t_loader), endless(o_loader)
    columns = {"template": (t_stream, t_train, "fp32"), "ours": (o_stream, o_train, auto)}
    if auto == "bf16":
        columns["ours fp32"] = (o_stream, o_train, "fp32")
    rates = {name: [] for name in columns}
    for _ in range(rounds):
        for name, (stream, train, mode) in columns.items():
            with matmul_precision(mode):
                train(Batches(stream, min(WARMUP, steps)))
                timed, start = Batches(stream, steps), time.perf_counter()
                train(timed)
                rates[name].append(timed.images / (time.perf_counter() - start))
            print(f"  {name:<9} {rates[name][-1]:8,.0f} images/s", flush=True)
    t_stream.close()  # stops the DataLoader's workers
    return {"steps": steps, "batch_size": {"template": t_batch, "ours": o_batch}, "rounds": rates,
            "images_per_s": {name: statistics.median(r) for name, r in rates.items()}}


def matmul_rate(size, mode):
    """GFLOP/s (median of MATMUL_REPS) of a square fp32 ``torch.mm`` in ``mode``, and its largest
    deviation from the plain fp32 product relative to the product's largest entry: 1e-6 or less when it
    computes in fp32, about 1e-3 when it rounds the inputs to bf16 (8 significant bits)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    exact = torch.mm(a, b)
    with matmul_precision(mode):
        deviation = ((torch.mm(a, b) - exact).abs().max() / exact.abs().max()).item()
        times = []
        for _ in range(MATMUL_REPS):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
    return {"gflops": 2 * size**3 / statistics.median(times) / 1e9, "relative_deviation": deviation}


def machine_facts():
    return {"cpu": harness_run.device_name(torch.device("cpu")), "amx": torch.cpu._is_amx_tile_supported(),
            "avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "logical_cores": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg()[0]}


def markdown(report):
    lines = ["# Training speed", "", f"`{report['command']}` at {report['started']}", "",
             *(f"- {key}: {value}" for key, value in report["machine"].items()),
             f"- training precision of ours (`--precision auto`): {report['precision']}", "",
             "| square torch.mm | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 | bf16 deviation | rounds? |",
             "|---|---|---|---|---|---|"]
    for size, row in report["matmul"].items():
        fp32, bf16 = row["fp32"]["gflops"], row.get("bf16")
        cells = "skipped | | |" if not bf16 else (
            f"{bf16['gflops']:.1f} | {bf16['gflops'] / fp32:.2f}x | {bf16['relative_deviation']:.1g} | "
            + ("yes" if bf16["relative_deviation"] > 1e-4 else "no: fp32 kernels"))
        lines.append(f"| {size} | {fp32:.1f} | {cells} |")
    lines += [] if BF16_FAST else ["", SKIPPED]
    lines += ["", NO_AMX] if report["precision"] != "bf16" else []
    lines += ["", f"Images/s, end to end with data loading, median of {report['rounds']} alternating rounds:",
              "", "| model | steps | batch template / ours | template | ours | ours / template | ours fp32 "
              "| bf16 / fp32 |", "|---|---|---|---|---|---|---|---|"]
    for key, row in report["models"].items():
        rate, batch = row["images_per_s"], row["batch_size"]
        fp32 = rate.get("ours fp32")
        fp32_cells = f"{fp32:,.0f} | {rate['ours'] / fp32:.2f}x" if fp32 else "- | -"
        lines.append(f"| {MODELS[key][0]} | {row['steps']} | {batch['template']} / {batch['ours']} | "
                     f"{rate['template']:,.0f} | {rate['ours']:,.0f} | {rate['ours'] / rate['template']:.2f}x"
                     f" | {fp32_cells} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=harness_run.positive_int, default=None,
                        help="timed steps per round and way, for every model (default VAE 200, GAN 160, "
                             "flow 20)")
    parser.add_argument("--rounds", type=harness_run.positive_int, default=3,
                        help="rounds per way (default 3)")
    parser.add_argument("--out", default="results", help="folder for benchmark.md and benchmark.json")
    parser.add_argument("--data_root", type=harness_run.existing_dir, default=harness_run.DEFAULT_DATA_ROOT,
                        help="folder holding MNIST/raw")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    harness_run.seed_everything(0)
    auto = harness_run.resolve_precision("auto", torch.device("cpu"))
    report = {"command": " ".join(["train_speed.py", *(sys.argv[1:] if argv is None else argv)]),
              "started": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_facts(), "precision": auto,
              "rounds": args.rounds, "matmul": {}, "models": {}}
    print(", ".join(f"{k} {v}" for k, v in report["machine"].items()), f"-> ours trains in {auto}")
    for size in MATMUL_SIZES:
        row = report["matmul"][size] = {mode: matmul_rate(size, mode) for mode in ("fp32", "bf16")
                                        if mode == "fp32" or BF16_FAST}
        print(f"torch.mm {size}: " + ", ".join(f"{mode} {r['gflops']:.1f} GFLOP/s (relative deviation "
                                              f"{r['relative_deviation']:.2g})" for mode, r in row.items()))
    if not BF16_FAST:
        print(SKIPPED)
    for key, (name, build) in MODELS.items():
        steps = args.steps or STEPS[key]
        print(f"{name}: {steps} steps x {args.rounds} rounds", flush=True)
        report["models"][key] = measure_model(build, args.data_root, steps, args.rounds, auto)
    out, text = Path(args.out), markdown(report)
    write_json(out / "benchmark.json", report)
    atomic_write(out / "benchmark.md", lambda tmp: Path(tmp).write_text(text))
    print(text + f"wrote {out / 'benchmark.md'} and {out / 'benchmark.json'}")
    return report


if __name__ == "__main__":
    main()
