"""The ablations, seed studies and sweeps that the README and the report cite, each one declared
entry that ``make ablations`` runs (or resumes) into ``results/ablations/<name>/``.

    python experiments.py                 # every entry, one after the other (resumable)
    python experiments.py gan_no_r1 ...   # only these
    python experiments.py --list          # the entries and the command each runs

An entry names its script, the settings it starts from (the script's DEFAULT or its TEMPLATE), the
``--set`` overrides it makes and its seed, and changes only those: its command is the script's own,
``python <script> --resume --out results/ablations/<name> --seed S [--template] --set k=v ...``. The
ablation table (``python -m report.tables``) compares each run's recorded settings with what its
entry declares, so a run made by older code shows what else differed.
"""

import argparse
import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

ABLATIONS_DIR = Path("results/ablations")


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    script: str          # the answer file that trains it
    note: str            # what it measures, in words
    overrides: dict = dataclasses.field(default_factory=dict)  # settings field -> value
    base: str = "default"  # "default" or "template": the settings the overrides apply to
    seed: int = 42

    def command(self, python=sys.executable):
        base = ["--template"] if self.base == "template" else []
        sets = [arg for name, value in self.overrides.items() for arg in ("--set", f"{name}={value}")]
        return [python, self.script, "--resume", "--out", str(ABLATIONS_DIR / self.name),
                "--seed", str(self.seed), *base, *sets]


GAN, NF = "a3_gan_template.py", "a3_nf_template.py"
EXPERIMENTS = (
    # The GAN: the template's training, each addition of ours taken away or varied, and seeds.
    Experiment("gan_template", GAN, "the course template's training", base="template"),
    Experiment("gan_no_r1", GAN, "without the R1 penalty", {"r1_gamma": 0.0}),
    Experiment("gan_batch_64", GAN, "the template's batch and learning rate",
               {"batch_size": 64, "lr": 2e-4}),
    Experiment("gan_batch_64_seed_1", GAN, "the template's batch and learning rate, another seed",
               {"batch_size": 64, "lr": 2e-4}, seed=1),
    Experiment("gan_batch_128_lr2e-4", GAN, "the template's learning rate at our batch", {"lr": 2e-4}),
    Experiment("gan_batch_128_lr4e-4", GAN, "learning rates decaying from a quarter of training",
               {"lr_decay_start": 0.25}),
    Experiment("gan_batch_128_lr4e-4_ema-0.998", GAN, "a shorter weight average", {"ema_decay": 0.998}),
    Experiment("gan_batch_128_lr4e-4_r1-0.6", GAN, "twice the R1 weight", {"r1_gamma": 0.6}),
    Experiment("gan_seed_42", GAN, "the default, seed 42: the seed study's first member"),
    Experiment("gan_seed_1", GAN, "the default, seed 1", seed=1),
    Experiment("gan_seed_2", GAN, "the default, seed 2", seed=2),
    # The flow: the template's batch, and its learning rate swept at that batch.
    Experiment("nf_batch_128", NF, "the template's batch", {"batch_size": 128}),
    Experiment("nf_lr_sweep_a", NF, "lr sweep at batch 128: 1e-3", {"batch_size": 128, "lr": 1e-3}),
    Experiment("nf_lr_sweep_b", NF, "lr sweep at batch 128: 2e-3", {"batch_size": 128, "lr": 2e-3}),
    Experiment("nf_lr_sweep_c", NF, "lr sweep at batch 128: 5e-4", {"batch_size": 128, "lr": 5e-4}),
)
BY_NAME = {experiment.name: experiment for experiment in EXPERIMENTS}


def expected_settings(experiment):
    """The settings an entry trains with, as a dict: its script's DEFAULT or TEMPLATE with its
    overrides."""
    module = importlib.import_module(Path(experiment.script).stem)
    start = module.TEMPLATE if experiment.base == "template" else module.DEFAULT
    return dataclasses.asdict(dataclasses.replace(start, **experiment.overrides))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="entries to run (default: all)")
    parser.add_argument("--list", action="store_true", help="print the entries and their commands")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in BY_NAME]
    if unknown:
        parser.error(f"no experiment {', '.join(unknown)} (see --list)")
    chosen = [BY_NAME[name] for name in args.names] or list(EXPERIMENTS)
    for experiment in chosen:
        command = experiment.command()
        if args.list:
            print(f"{experiment.name}: {experiment.note}\n    {' '.join(command[1:])}")
            continue
        print(f"== {experiment.name}: {experiment.note}", flush=True)
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
