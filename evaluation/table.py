"""The closing comparison: every trained model in results/*/metrics.json next to real data, and
the ablations of results/ablations/*/metrics.json in one table.

Writes ``comparison.md`` (for people), ``comparison.json`` (for the report), ``precision_recall``
(PNG + PDF) and ``ablations.md`` into the results folder; rows scored by different classifiers
are refused, since their numbers are on different yardsticks. A model's evaluation comes from its
metrics.json or, when newer, from the evaluation.json that ``python -m evaluation --model ...
--checkpoint ...`` wrote beside its checkpoint.
"""

import json
from pathlib import Path

from common import RunError, atomic_write, write_json
from evaluation.figures import save_precision_recall_figure

MODEL_ORDER = ("vae", "vae_z2", "gan", "nf")
LABELS = {"vae": "VAE", "vae_z2": "VAE (z=2)", "gan": "GAN", "nf": "RealNVP flow"}
EVALUATION_KEYS = ("classifier_sha256", "fid", "precision", "recall", "score", "class_fractions",
                   "class_kl_uniform", "memorisation", "parzen_ll", "parzen_se", "parzen_sigma", "n_samples")
COLUMNS = ("model", "FID ↓", "precision ↑", "recall ↑", "score ↑", "class KL ↓", "class % min/max",
           "memorised % pixels / features", "Parzen LL ↑ (nats)", "own likelihood", "params", "train time")
NOTES = """\
All sample measures use 10,000 samples and the committed digit classifier (SHA-256 below). FID:
Frechet distance between Gaussians fitted to the classifier's penultimate features of the samples
and of the 10,000 test images; it mixes fidelity and diversity. Precision and recall (Kynkäänniemi
et al., 2019, k = 3, in the same features): the share of samples inside the k-nearest-neighbour
balls of the test images (fidelity), and the share of test images inside those of the samples
(diversity); the k-NN balls overestimate a manifold near outliers. Score: exp(E_x KL(p(y|x) ||
p(y))) with that classifier (1 to 10). Class KL: KL(class histogram of the samples || uniform) in
nats, with the smallest and largest class share. Memorised: the share of samples nearer to their
nearest training image (pixels; classifier features) than 99% of test images are to theirs: about
1% for a model that does not copy, more if it reproduces training images; it sees near-copies only,
not memorised parts or styles. Parzen LL: mean log-likelihood of the test images under Gaussian
kernels on the samples, width chosen on training images 50,000-59,999 (Goodfellow et al., 2014;
their GAN: 225 +- 2), +- standard error; a weak measure (Theis et al., 2016): it rewards samples
near the test images rather than a good density, and a model can beat real data on it. Own
likelihood: the VAE's negative ELBO and importance-sampled NLL on binarized MNIST, the flow's bits
per dimension on dequantized MNIST; the two are on different data and not comparable with each other
or with Parzen. Train time: training seconds on the CPU, unless a device is named in brackets. The
real-data row scores random 10,000-image subsets of the training images (before image 50,000) as
samples, mean ± standard deviation over the subsets: the ceiling for score, coverage, precision and
recall, and for FID the floor that two finite real samples reach; it has no memorisation share, as
training images are their own nearest neighbours.
"""


def latest_evaluation(run_dir, metrics):
    """The evaluation dict of a run: from metrics.json, or from evaluation.json if that is newer."""
    separate = Path(run_dir) / "evaluation.json"
    if separate.exists() and (not metrics.get("evaluation")
                              or separate.stat().st_mtime > (Path(run_dir) / "metrics.json").stat().st_mtime):
        return json.loads(separate.read_text())
    return metrics.get("evaluation") or {}


def extension_label(name, args):
    """``make extensions`` runs by what they change: the VAE's posterior and bound, the flow's coupling
    network and dequantization."""
    if name.startswith("vae"):
        posterior = args.get("posterior", "gaussian")
        steps = "" if posterior == "gaussian" else f" K={args.get('flow_steps')}"
        bound = "" if args.get("iw_samples", 1) == 1 else f", IW k={args['iw_samples']}"
        return f"VAE, {posterior}{steps}{bound}, {args.get('epochs')} epochs (ext.)"
    return f"RealNVP, {args.get('coupling')} couplings, {args.get('dequantization')} (ext.)"


def model_row(run_dir, extension=False):
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    evaluation = latest_evaluation(run_dir, metrics)
    test = metrics.get("test") or {}
    label = LABELS.get(run_dir.name, run_dir.name)
    zdim = (metrics.get("args") or {}).get("zdim")
    if run_dir.name == "vae" and zdim is not None:
        label = f"VAE (z={zdim})"
    if extension:
        label = extension_label(run_dir.name, metrics.get("args") or {})
    return {
        "name": run_dir.name,
        "label": label,
        "reference": False,
        **{key: evaluation.get(key) for key in EVALUATION_KEYS},
        **{key: test.get(key) for key in ("negative_elbo", "nll_importance", "importance_samples", "bpd")},
        "n_params": metrics.get("n_params"),
        "wall_time_s": metrics.get("wall_time_s"),
        "device": metrics.get("device"),
    }


def model_rows(results_dir):
    """One row per results/<name>/metrics.json: the four assignment runs first, then any others, then
    the runs of ``make extensions`` (results/extensions/<name>/metrics.json)."""
    runs = [path.parent for path in Path(results_dir).glob("*/metrics.json")]
    order = {name: i for i, name in enumerate(MODEL_ORDER)}
    runs.sort(key=lambda run: (order.get(run.name, len(order)), run.name))
    extensions = sorted(path.parent for path in Path(results_dir).glob("extensions/*/metrics.json"))
    return [model_row(run) for run in runs] + [model_row(run, extension=True) for run in extensions]


def _number(value, spec):
    return "n/a" if value is None else format(value, spec)


def _measure(row, key, spec):
    """The value of ``key``, with ± its standard deviation where the row has one (the real data)."""
    if row.get(key) is None:
        return "n/a"
    sd = row.get(f"{key}_sd")
    return format(row[key], spec) + ("" if sd is None else f" ± {format(sd, spec)}")


def own_likelihood(row):
    if row.get("negative_elbo") is not None:
        text = f"−ELBO {row['negative_elbo']:.2f} nats"
        if row.get("nll_importance") is not None:
            text += f", NLL {row['nll_importance']:.2f} nats (K={row.get('importance_samples')})"
        return text
    if row.get("bpd") is not None:
        return f"{row['bpd']:.3f} bits/dim"
    return "n/a"


def markdown_cells(row):
    fractions = row.get("class_fractions")
    coverage = "n/a" if not fractions else f"{100 * min(fractions):.1f} / {100 * max(fractions):.1f}"
    parzen = "n/a" if row.get("parzen_ll") is None else \
        f"{row['parzen_ll']:.1f} ± {row.get('parzen_ll_sd', row['parzen_se']):.1f}"
    memorised = row.get("memorisation")
    memorised = "n/a" if not memorised else \
        f"{100 * memorised['pixel']['share']:.2f} / {100 * memorised['feature']['share']:.2f}"
    seconds = row.get("wall_time_s")
    return [
        row["label"],
        _measure(row, "fid", ".2f"),
        _measure(row, "precision", ".3f"),
        _measure(row, "recall", ".3f"),
        _measure(row, "score", ".2f"),
        _measure(row, "class_kl_uniform", ".4f"),
        coverage,
        memorised,
        parzen,
        own_likelihood(row),
        _number(row.get("n_params"), ","),
        "n/a" if seconds is None else f"{seconds / 60:.1f} min" + (
            "" if row.get("device") in (None, "cpu") else f" ({row['device']})"),
    ]


def check_one_classifier(rows):
    """Refuse a table whose rows were scored by different classifiers (or by one of unknown hash)."""
    scored = [row for row in rows if row.get("fid") is not None]
    hashes = {row.get("classifier_sha256") for row in scored}
    if len(hashes) > 1:
        named = ", ".join(f"{row['name']} ({str(row.get('classifier_sha256') or 'unknown')[:12]})"
                          for row in scored)
        raise RunError(f"the rows were scored by different digit classifiers: {named}. Score them "
                       "again with the committed one (make figures, or python -m evaluation --model ...)")
    return hashes.pop() if hashes else None


def to_markdown(rows, classifier_test_accuracy=None, classifier_sha256=None):
    lines = ["# Model comparison", "",
             "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(markdown_cells(row)) + " |" for row in rows]
    lines += ["", NOTES.replace("\n", " ").strip()]
    if classifier_test_accuracy is not None:
        weights = "" if classifier_sha256 is None else f"; SHA-256 of its weights: `{classifier_sha256}`"
        lines += ["", f"Digit classifier test accuracy: {classifier_test_accuracy:.2%}{weights}."]
    return "\n".join(lines) + "\n"


def write_table(results_dir, references):
    """Write comparison.md, comparison.json and the precision-recall figure into ``results_dir``;
    ``references`` is what ``evaluation.reference_rows`` returns. Returns the rows."""
    results_dir = Path(results_dir)
    rows = model_rows(results_dir) + [{**row, "reference": True} for row in references["rows"]]
    classifier = check_one_classifier(rows)
    accuracy = references.get("classifier_test_accuracy")
    atomic_write(results_dir / "comparison.md",
                 lambda tmp: tmp.write_text(to_markdown(rows, accuracy, classifier)))
    write_json(results_dir / "comparison.json",
               {"classifier_test_accuracy": accuracy, "classifier_sha256": classifier, "rows": rows})
    save_precision_recall_figure(rows, results_dir / "precision_recall")
    return rows


# ---------------------------------------------------------------- ablations

ABLATION_COLUMNS = ("run", "compared with the default, it changes", "also differs", "FID at the end",
                    "best FID (epoch)", "val / test", "train time", "commit")


def ablation_cells(name, metrics, note):
    evaluation = metrics.get("evaluation") or {}
    progress = metrics.get("progress") or []
    best = min(progress, key=lambda row: row["fid"]) if progress else None
    curves, test = metrics.get("curves") or {}, metrics.get("test") or {}
    likelihood = "n/a"
    if curves.get("val_bpd") and test.get("bpd") is not None:
        likelihood = f"{curves['val_bpd'][-1]:.4f} / {test['bpd']:.4f} bits/dim"
    seconds = metrics.get("wall_time_s")
    return [
        f"`{name}`", note.get("changes", ""), note.get("also", ""),
        _number(evaluation.get("fid"), ".2f"),
        "n/a" if best is None else f"{best['fid']:.2f} ({best['epoch']})",
        likelihood,
        "n/a" if seconds is None else f"{seconds / 60:.1f} min" + (
            "" if metrics.get("device") in (None, "cpu") else f" ({metrics['device']})"),
        f"`{str(metrics.get('git_commit', 'unknown'))[:7]}`",
    ]


def write_ablation_table(results_dir):
    """results/ablations.md: one row per results/ablations/<name>/metrics.json, with what it
    changes from the default run as results/ablations/notes.json says."""
    folder = Path(results_dir) / "ablations"
    notes = json.loads((folder / "notes.json").read_text()) if (folder / "notes.json").exists() else {}
    lines = ["# Ablations and seed studies", "",
             "Each row is one full training run, compared with the default run of its model in "
             "results/<model>/ (generated from results/ablations/*/metrics.json and notes.json). FIDs "
             "are against the 10,000 test images, from the runs' own evaluation. Training times compare "
             "only between runs on the same machine.", "",
             "| " + " | ".join(ABLATION_COLUMNS) + " |",
             "|" + "|".join("---" for _ in ABLATION_COLUMNS) + "|"]
    for path in sorted(folder.glob("*/metrics.json")):
        metrics = json.loads(path.read_text())
        name = path.parent.name
        lines.append("| " + " | ".join(ablation_cells(name, metrics, notes.get(name, {}))) + " |")
    atomic_write(Path(results_dir) / "ablations.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
