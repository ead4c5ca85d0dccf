"""The selection experiments, ablations and seed studies that the README and the report cite, and the
runs beyond the assignment, each one declared entry that ``make ablations`` (suite "ablations") or
``make extensions`` (suite "extensions") runs (or resumes), into ``results/ablations/<name>/`` or
the folder the entry names.

    python experiments.py                      # the ablations suite, one run after the other (resumable)
    python experiments.py --suite extensions   # the runs beyond the assignment
    python experiments.py gan_r1 ...           # only these
    python experiments.py --list               # the entries and the command each runs
    python experiments.py --suite extensions --from_weights  # redraw their figures from weights.pt

An entry names its script, the settings it starts from (the script's DEFAULT or its TEMPLATE), the
``--set`` overrides it makes and its seed, and changes only those: its command is the script's own,
``python <script> --resume --out results/ablations/<name> --seed S [--template] --set k=v ...``, or
for an extension module (extensions/vae_flows.py) ``python -m extensions.vae_flows ...``, as running
its file would break its imports. An entry whose run is a canonical one (the default, seed 42, or a
run of ``make extensions``) names that folder as its ``out``. Candidates compete within their script
and their ``group`` (the VAE's flow length: planar against planar, IAF against IAF).

Every setting of a DEFAULT is chosen here on held-out data that is not the test set (the test set
scores each run once, at the end, and is not read when choosing):

- VAE: the template's training, each of the four additions alone, all four but one, and all four
  (the default); chosen by the validation NLL (importance-sampled, K = importance_samples), the validation
  negative ELBO beside it.
- GAN: a ladder from the template's training, one addition per rung: R1 (two weights), the weight
  average, the learning-rate decay (the default), then batch 128 at twice the learning rate; chosen
  by the FID against the selection reference (10,000 training images, evaluation.REFERENCES), with a
  second seed of the template and of the default for the spread.
- Flow: the template's training, and the learning rate at the default batch (the template's 128)
  and at batch 256, on shortened runs (10 epochs, the schedule compressed to them): a shortlist,
  whose two best by the validation bits/dim then train in full (group "in full", with the default),
  and the full runs' validation bits/dim chooses.
- Beyond the assignment (``make extensions``): the VAE's flow length, planar K = 4 and 8, IAF K = 2
  and 4 (80 epochs each; K = 8 and K = 4 are the extension's own runs), chosen per posterior by the
  validation NLL; the learning rate of the convolutional and of the multi-scale flow (5e-4, 1e-3,
  2e-3 on runs shortened to 4 epochs), chosen by the validation bits/dim. Then the extension's runs
  in ``results/extensions/``: the Gaussian posterior, the importance-weighted bound at k = 5 (IWAE's
  and DReG's gradient) and k = 20, a second seed of four of them, and the four flows.

The ablation table (``python -m report.tables ablations``) shows these scores and compares each
run's recorded settings with what its entry declares, so a run made by older code shows what else
differed.
"""

import argparse
import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

RESULTS_DIR = Path("results")
ABLATIONS_DIR = RESULTS_DIR / "ablations"


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    script: str          # the answer file, or extension module's file, that trains it
    note: str            # what it measures, in words
    overrides: dict = dataclasses.field(default_factory=dict)  # settings field -> value
    base: str = "default"  # "default" or "template": the settings the overrides apply to
    seed: int = 42
    out: str | None = None  # its run folder, if not results/ablations/<name> (a canonical run's)
    candidate: bool = True  # whether it competes in its model's selection (not a seed study or full run)
    group: str = ""  # candidates compete only with those of their script and group

    @property
    def folder(self):
        return Path(self.out) if self.out else ABLATIONS_DIR / self.name

    @property
    def suite(self):
        """The make target that trains it: "extensions" for an extension module's, else "ablations"."""
        return "extensions" if Path(self.script).parts[0] == "extensions" else "ablations"

    @property
    def module(self):
        """The script as a module: a3_vae_template, extensions.vae_flows."""
        return Path(self.script).with_suffix("").as_posix().replace("/", ".")

    def command(self, python=sys.executable, action="--resume"):
        """The script's command line that trains (``--resume``) or redraws (``--from_weights``) it."""
        # A file inside a package (extensions/) runs as its module, so that its imports resolve.
        script = [self.script] if Path(self.script).parent == Path(".") else ["-m", self.module]
        base = ["--template"] if self.base == "template" else []
        sets = [arg for name, value in self.overrides.items() for arg in ("--set", f"{name}={value}")]
        return [python, *script, action, "--out", str(self.folder), "--seed", str(self.seed),
                *base, *sets]


VAE, GAN, NF = "a3_vae_template.py", "a3_gan_template.py", "a3_nf_template.py"
# The selection runs of the VAE report validation measures; their test NLL is taken at the
# validation's K, not at the canonical run's larger one.
VAE_SELECTION = {"test_importance_samples": 500}
R1 = {"r1_gamma": 0.3, "r1_interval": 8}
EMA = {"ema_decay": 0.999}
NF_SHORT = {"epochs": 10}
VAE_FLOWS = "extensions/vae_flows.py"
EXTENSIONS_DIR = RESULTS_DIR / "extensions"
GAUSSIAN, PLANAR, IAF = ({"posterior": name} for name in ("gaussian", "planar", "iaf"))
PLANAR_K8, IAF_K4 = {**PLANAR, "flow_steps": 8}, {**IAF, "flow_steps": 4}
IW5 = {**GAUSSIAN, "iw_samples": 5}
NF_CONV, NF_MULTISCALE = "extensions/nf_couplings.py", "extensions/nf_multiscale.py"
EXTENSION_NF_SHORT = {"epochs": 4}
# Settings a candidate may change without their being chosen: the run's length (a shortened selection
# run) and the test's K (measured once, at the end, and not read when choosing).
NOT_CHOSEN = ("epochs", "test_importance_samples")
EXPERIMENTS = (
    # The VAE: from the template's training, each of the default's four additions alone, all four but
    # one, and all four.
    Experiment("vae_template", VAE, "the course template's training", VAE_SELECTION, base="template"),
    Experiment("vae_template_two_layers", VAE, "+ a second hidden layer",
               {"hidden_layers": 2, **VAE_SELECTION}, base="template"),
    Experiment("vae_template_dynamic_binarization", VAE, "+ dynamic binarization",
               {"dynamic_binarization": True, **VAE_SELECTION}, base="template"),
    Experiment("vae_template_kl_warmup", VAE, "+ KL warm-up over 5 epochs",
               {"kl_warmup_epochs": 5, **VAE_SELECTION}, base="template"),
    Experiment("vae_template_cosine_decay", VAE, "+ cosine learning-rate decay",
               {"cosine_decay": True, **VAE_SELECTION}, base="template"),
    Experiment("vae_without_two_layers", VAE, "all four but the second hidden layer",
               {"hidden_layers": 1, **VAE_SELECTION}),
    Experiment("vae_without_dynamic_binarization", VAE, "all four but dynamic binarization",
               {"dynamic_binarization": False, **VAE_SELECTION}),
    Experiment("vae_without_kl_warmup", VAE, "all four but the KL warm-up",
               {"kl_warmup_epochs": 0, **VAE_SELECTION}),
    Experiment("vae_without_cosine_decay", VAE, "all four but the cosine decay",
               {"cosine_decay": False, **VAE_SELECTION}),
    Experiment("vae_default", VAE, "all four: the default", out="results/vae"),
    # The GAN: a ladder from the template's training, one addition per rung, and a second seed of each end.
    Experiment("gan_template", GAN, "the course template's training", base="template"),
    Experiment("gan_r1", GAN, "+ R1, gamma 0.3, every 8th batch", R1, base="template"),
    Experiment("gan_r1_gamma_1", GAN, "+ R1 with gamma 1 instead", {**R1, "r1_gamma": 1.0}, base="template"),
    Experiment("gan_r1_ema", GAN, "+ the weight average of G", {**R1, **EMA}, base="template"),
    Experiment("gan_default", GAN, "+ the learning-rate decay over the second half: the default",
               out="results/gan"),
    Experiment("gan_default_batch_128", GAN, "+ batch 128 at learning rate 4e-4",
               {"batch_size": 128, "lr": 4e-4}),
    Experiment("gan_template_seed_1", GAN, "the template's training, seed 1", base="template", seed=1,
               candidate=False),
    Experiment("gan_default_seed_1", GAN, "the default, seed 1", seed=1, candidate=False),
    # The flow, on shortened runs: the template's training (no warm-up, decay or clipping), then the
    # learning rate at the default's batch (the template's) and at twice it. The two best of these
    # then train in full, and the full runs choose.
    Experiment("nf_template", NF, "10 epochs, the course template's training", NF_SHORT, base="template"),
    Experiment("nf_lr_5e-4", NF, "10 epochs, lr 5e-4 (the default's)", NF_SHORT),
    Experiment("nf_lr_1e-3", NF, "10 epochs, lr 1e-3 (the template's)", {**NF_SHORT, "lr": 1e-3}),
    Experiment("nf_lr_2e-3", NF, "10 epochs, lr 2e-3", {**NF_SHORT, "lr": 2e-3}),
    *(Experiment(f"nf_batch_256_lr_{text}", NF, f"10 epochs, batch 256, lr {text}",
                 {**NF_SHORT, "batch_size": 256, "lr": lr})
      for text, lr in (("2.5e-4", 2.5e-4), ("5e-4", 5e-4), ("1e-3", 1e-3))),
    Experiment("nf_lr_1e-3_in_full", NF, "lr 1e-3 in full", {"lr": 1e-3}, group="in full"),
    Experiment("nf_default", NF, "lr 5e-4 in full: the default", out="results/nf", group="in full"),
    # Beyond the assignment. The VAE's flow length, per posterior, at the extension's 80 epochs; the
    # chosen lengths are the extension's runs.
    Experiment("vae_planar_k4", VAE_FLOWS, "planar flow, K = 4",
               {**PLANAR, "flow_steps": 4, **VAE_SELECTION}, group="planar"),
    Experiment("vae_planar_k8", VAE_FLOWS, "planar flow, K = 8", PLANAR_K8,
               out=f"{EXTENSIONS_DIR}/vae_planar_k8", group="planar"),
    Experiment("vae_iaf_k2", VAE_FLOWS, "IAF, K = 2", {**IAF, "flow_steps": 2, **VAE_SELECTION},
               group="iaf"),
    Experiment("vae_iaf_k4", VAE_FLOWS, "IAF, K = 4", IAF_K4,
               out=f"{EXTENSIONS_DIR}/vae_iaf_k4", group="iaf"),
    # The extension's other VAE runs: the Gaussian posterior, the importance-weighted bound (IWAE's and
    # DReG's gradient), and a second seed of four of them.
    *(Experiment(name, VAE_FLOWS, note, overrides, out=f"{EXTENSIONS_DIR}/{name}", candidate=False)
      for name, note, overrides in (
          ("vae_gaussian", "the Gaussian posterior", GAUSSIAN),
          ("vae_iw5", "the importance-weighted bound, k = 5", IW5),
          ("vae_iw5_dreg", "k = 5 with DReG's gradient", {**IW5, "iw_estimator": "dreg"}),
          ("vae_iw20", "the importance-weighted bound, k = 20", {**GAUSSIAN, "iw_samples": 20}))),
    *(Experiment(f"{name}_seed_1", VAE_FLOWS, f"{name}, seed 1", overrides, seed=1,
                 out=f"{EXTENSIONS_DIR}/{name}_seed_1", candidate=False)
      for name, overrides in (("vae_gaussian", GAUSSIAN), ("vae_iaf_k4", IAF_K4),
                              ("vae_planar_k8", PLANAR_K8), ("vae_iw5", IW5))),
    # The learning rate of the convolutional and of the multi-scale flow, on runs shortened to 4 epochs;
    # then each flow in full, with uniform and with variational dequantization.
    *(Experiment(f"{name}_lr_{text}", script,
                 f"4 epochs, lr {text}" + (" (the default's)" if lr == 1e-3 else ""),
                 {**EXTENSION_NF_SHORT, "lr": lr})
      for name, script in (("nf_conv", NF_CONV), ("nf_multiscale", NF_MULTISCALE))
      for text, lr in (("5e-4", 5e-4), ("1e-3", 1e-3), ("2e-3", 2e-3))),
    *(Experiment(f"{name}{suffix}", script, f"{note}, {dequantization} dequantization",
                 {"dequantization": "variational"} if suffix else {},
                 out=f"{EXTENSIONS_DIR}/{name}{suffix}", candidate=False)
      for name, script, note in (("nf_conv", NF_CONV, "convolutional couplings"),
                                 ("nf_multiscale", NF_MULTISCALE, "the multi-scale flow"))
      for suffix, dequantization in (("", "uniform"), ("_variational", "variational"))),
)
SUITES = ("ablations", "extensions")
BY_NAME = {experiment.name: experiment for experiment in EXPERIMENTS}


def expected_settings(experiment):
    """The settings an entry trains with, as a dict: its script's DEFAULT or TEMPLATE with its
    overrides."""
    module = importlib.import_module(experiment.module)
    start = module.TEMPLATE if experiment.base == "template" else module.DEFAULT
    return dataclasses.asdict(dataclasses.replace(start, **experiment.overrides))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="entries to run (default: all of the suite)")
    parser.add_argument("--suite", choices=SUITES, default="ablations",
                        help="without names, the entries of this suite (default ablations)")
    parser.add_argument("--list", action="store_true", help="print the entries (of both suites) and their "
                        "commands")
    parser.add_argument("--from_weights", action="store_true",
                        help="redraw the figures and measures of the runs that have a weights.pt, "
                             "training nothing")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in BY_NAME]
    if unknown:
        parser.error(f"no experiment {', '.join(unknown)} (see --list)")
    chosen = [BY_NAME[name] for name in args.names] or \
        [experiment for experiment in EXPERIMENTS if args.list or experiment.suite == args.suite]
    action = "--from_weights" if args.from_weights else "--resume"
    without_weights = []
    for experiment in chosen:
        command = experiment.command(action=action)
        if args.list:
            print(f"{experiment.name} ({experiment.suite}): {experiment.note}\n    {' '.join(command[1:])}")
            continue
        if args.from_weights and not (experiment.folder / "weights.pt").exists():
            without_weights.append(experiment.name)
            continue
        print(f"== {experiment.name}: {experiment.note}", flush=True)
        subprocess.run(command, check=True)
    if without_weights:
        print(f"not redrawn, no weights.pt: {', '.join(without_weights)}")


if __name__ == "__main__":
    main()
