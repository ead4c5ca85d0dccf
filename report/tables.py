"""The closing comparison and the ablations, as tables for people: every run's metrics.json side by side.

    python -m report.tables                  # all of the below
    python -m report.tables comparison       # or only some: comparison, ablations, extensions

- comparison: every trained model, results/*/metrics.json then results/extensions/*/metrics.json,
  next to real data (``evaluation.reference_rows``, cached in results/reference.json) in
  results/comparison.md (for people), results/comparison.json (for the report) and
  results/precision_recall.{png,pdf}. Rows scored by different classifiers are refused: their numbers
  are on different yardsticks. A model's evaluation comes from its metrics.json or, when newer, from
  the evaluation.json that ``python -m evaluation --model M --checkpoint C`` wrote beside it.
- ablations: results/ablations.md, a section per script (the answer files, then the extension
  modules), one row per entry of experiments.py (and per run folder in results/ablations/ that none
  declares), each compared with its model's default; candidates compete within their entry's group.
  "also differs" is what the run recorded (settings, seed, script) against what its entry declares,
  so that a run made by older code shows its confound.
- extensions: results/extensions/{vae,nf}_extensions.{md,png,pdf} and nf_samples.{png,pdf}
  (``report.extension_tables``).

Runs are read through ``harness.schema.read`` (an undeclared shape is an error, not a guess). Text files
are rewritten only when their content changes and figures are deterministic, so regenerating unchanged
tables leaves ``git status`` clean.

To add a model: its script writes results/<name>/metrics.json through ``harness.Run.finish``; it then
gets a row here on its own (after MODEL_ORDER's, labelled by LABELS or its folder name). To add a
metric: return it from ``evaluation.evaluate_samples``, add its key to EVALUATION_KEYS, a column to
COLUMNS with its cell in ``markdown_cells`` and a sentence to NOTES.
"""

import argparse
import dataclasses
import json
from pathlib import Path

import matplotlib.pyplot as plt

import experiments
from evaluation import reference_rows
from harness import RunError, cli, get_device, save_figure, schema
from harness.files import write_json, write_text_if_changed
from harness.run import DEFAULT_DATA_ROOT

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
TABLES = ("comparison", "ablations", "extensions")


# ---------------------------------------------------------------- reading runs

def latest_evaluation(run_dir, metrics):
    """The evaluation dict of a run: from metrics.json, or from evaluation.json if that is newer."""
    separate = Path(run_dir) / "evaluation.json"
    if separate.exists() and (not metrics.get("evaluation")
                              or separate.stat().st_mtime > (Path(run_dir) / "metrics.json").stat().st_mtime):
        return json.loads(separate.read_text())
    return metrics.get("evaluation") or {}


def read_run(run_dir):
    """A run's metrics (``harness.schema.read``), its "evaluation" the latest one (see
    ``latest_evaluation``): what every table and the report show of a run."""
    metrics = schema.read(run_dir)
    return {**metrics, "evaluation": latest_evaluation(run_dir, metrics)}


# ---------------------------------------------------------------- the comparison

def extension_label(name, settings, script=None, seed=42):
    """``make extensions`` runs by what they change: the VAE's posterior, its bound and the bound's
    gradient estimator; the flow's architecture (``script``, the module that made the run: the
    multi-scale flow's settings have no coupling) and dequantization; and a seed other than 42."""
    seed = "" if seed == 42 else f", seed {seed}"
    if name.startswith("vae"):
        posterior = settings["posterior"]
        steps = "" if posterior == "gaussian" else f" K={settings['flow_steps']}"
        bound = "" if settings["iw_samples"] == 1 else f", IW k={settings['iw_samples']}"
        if settings.get("iw_estimator", "iwae") == "dreg":  # runs before the estimator existed: IWAE's
            bound += ", DReG"
        return f"VAE, {posterior}{steps}{bound}, {settings['epochs']} epochs{seed} (ext.)"
    architecture = "multi-scale" if script == "extensions/nf_multiscale.py" else \
        f"{settings['coupling']} couplings"
    return f"RealNVP, {architecture}, {settings['dequantization']}{seed} (ext.)"


def model_rows_of(run_dir, extension=False):
    """A run's rows of the comparison: one per set of samples it scored. The VAE scores the decoder
    means ("evaluation") and the binary images drawn from them ("evaluation_binary"): two rows."""
    row = model_row(run_dir, extension)
    binary = read_run(run_dir).get("evaluation_binary")
    if not binary:
        return [row]
    return [{**row, "label": f"{row['label']}, means"},
            {**row, **{key: binary.get(key) for key in EVALUATION_KEYS}, "name": f"{row['name']}_binary",
             "label": f"{row['label']}, binary samples"}]


def model_row(run_dir, extension=False):
    run_dir = Path(run_dir)
    metrics = read_run(run_dir)
    evaluation, test, settings = metrics["evaluation"], metrics.get("test") or {}, metrics["settings"]
    if extension:
        label = extension_label(run_dir.name, settings, metrics["script"], metrics["seed"])
    elif run_dir.name == "vae":
        label = f"VAE (z={settings['z_dim']})"
    else:
        label = LABELS.get(run_dir.name, run_dir.name)
    return {
        "name": run_dir.name,
        "label": label,
        "reference": False,
        **{key: evaluation.get(key) for key in EVALUATION_KEYS},
        **{key: test.get(key) for key in ("negative_elbo", "nll_importance", "importance_samples", "bpd")},
        "n_params": metrics["n_params"],
        "wall_time_s": metrics["wall_time_s"],
        "device": metrics["device"],
    }


def model_rows(results_dir):
    """One row per results/<name>/metrics.json: the four assignment runs first, then any others, then
    the runs of ``make extensions`` (results/extensions/<name>/metrics.json)."""
    runs = [path.parent for path in Path(results_dir).glob("*/metrics.json")]
    order = {name: i for i, name in enumerate(MODEL_ORDER)}
    runs.sort(key=lambda run: (order.get(run.name, len(order)), run.name))
    extensions = sorted(path.parent for path in Path(results_dir).glob("extensions/*/metrics.json"))
    return [row for run in runs for row in model_rows_of(run)] + \
        [row for run in extensions for row in model_rows_of(run, extension=True)]


def _number(value, spec):
    return "n/a" if value is None else format(value, spec)


def _measure(row, key, spec):
    """The value of ``key``, with ± its standard deviation where the row has one (the real data)."""
    if row.get(key) is None:
        return "n/a"
    sd = row.get(f"{key}_sd")
    return format(row[key], spec) + ("" if sd is None else f" ± {format(sd, spec)}")


def _minutes(seconds, device):
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min" + (
        "" if device in (None, "cpu") else f" ({device})")


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
        _minutes(row.get("wall_time_s"), row.get("device")),
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


def markdown_table(columns, cells):
    """A Markdown table: the header, its rule, one line per row of cells."""
    return ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|",
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in cells)]


def to_markdown(rows, classifier_test_accuracy=None, classifier_sha256=None):
    lines = ["# Model comparison", "", *markdown_table(COLUMNS, [markdown_cells(row) for row in rows])]
    lines += ["", NOTES.replace("\n", " ").strip()]
    if classifier_test_accuracy is not None:
        weights = "" if classifier_sha256 is None else f"; SHA-256 of its weights: `{classifier_sha256}`"
        lines += ["", f"Digit classifier test accuracy: {classifier_test_accuracy:.2%}{weights}."]
    return "\n".join(lines) + "\n"


def save_precision_recall_figure(rows, stem):
    """Precision (fidelity) against recall (diversity), one marker per row of the comparison; rows
    with a standard deviation (the real-data reference) get error bars. Rows without precision
    are left out, and no figure is drawn when none has it."""
    rows = [row for row in rows if row.get("precision") is not None]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(3.3, 3.0), layout="constrained")
    for row in rows:
        ax.errorbar(row["recall"], row["precision"], xerr=row.get("recall_sd"), yerr=row.get("precision_sd"),
                    marker="s" if row.get("reference") else "o", markersize=5, capsize=2, linestyle="none",
                    label=row["label"])
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall (share of test images covered)")
    ax.set_ylabel("precision (share of samples realistic)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize=7)
    save_figure(fig, stem)


def write_table(results_dir, references):
    """Write comparison.md, comparison.json and the precision-recall figure into ``results_dir``;
    ``references`` is what ``evaluation.reference_rows`` returns. Returns the rows."""
    results_dir = Path(results_dir)
    rows = model_rows(results_dir) + [{**row, "reference": True} for row in references["rows"]]
    classifier = check_one_classifier(rows)
    accuracy = references.get("classifier_test_accuracy")
    write_text_if_changed(results_dir / "comparison.md", to_markdown(rows, accuracy, classifier))
    write_json(results_dir / "comparison.json",
               {"classifier_test_accuracy": accuracy, "classifier_sha256": classifier, "rows": rows})
    save_precision_recall_figure(rows, results_dir / "precision_recall")
    return rows


# ---------------------------------------------------------------- ablations

ABLATION_INTRO = (
    "Every row is one training run of an entry of experiments.py (generated by `python -m report.tables "
    "ablations` from each entry's metrics.json). \"declared\" is what the entry sets: its base (the "
    "template's settings or the default's), its `--set` overrides and its seed; \"also differs\" is "
    "where the settings the run recorded differ from those, as for runs made by older code. Each model's "
    "candidates are compared by a score on held-out data that is not the test set, and the lowest is "
    "chosen, within the group a sentence below its table names where a section has several (the flow "
    "posteriors' lengths: planar against planar, IAF against IAF). Where shortened runs are a "
    "shortlist (the RealNVP flow's), the best of them train in full, and the runs in full choose; "
    "seed studies and the extensions' runs in full do not compete. The test column is measured once, at "
    "the end of each run, and is not read when choosing. Training times compare only between runs on the "
    "same machine.")


def _show(value):
    return format(value, "g") if isinstance(value, float) else str(value)


def declared(experiment):
    """What an entry sets, in one line: its base, its overrides and its seed."""
    parts = ["the template's settings"] if experiment.base == "template" else []
    parts += [f"{name}={_show(value)}" for name, value in experiment.overrides.items()]
    return ", ".join([*parts, f"seed={experiment.seed}"])


def also_differs(metrics, experiment, expected):
    """Where a run's record differs from its entry: the script, the seed, and each setting whose
    recorded value is not the ``expected`` one (a setting the script no longer has, or one the run did
    not record, included). Empty for a run of the entry as declared."""
    recorded, differ = metrics["settings"], []
    if metrics["script"] != experiment.script:
        differ.append(f"script {metrics['script']} (declared {experiment.script})")
    if metrics["seed"] != experiment.seed:
        differ.append(f"seed={metrics['seed']} (declared {experiment.seed})")
    for name in sorted(recorded.keys() | expected.keys()):
        if name not in expected:
            differ.append(f"{name}={_show(recorded[name])} (no such setting now)")
        elif name not in recorded:
            differ.append(f"{name} not recorded (declared {_show(expected[name])})")
        elif recorded[name] != expected[name]:
            differ.append(f"{name}={_show(recorded[name])} (declared {_show(expected[name])})")
    return ", ".join(differ)


def selection_fid(metrics):
    """The GAN's FID, precision and recall against the selection reference at its last epoch."""
    last = [row for row in metrics.get("progress") or [] if row.get("epoch") == metrics["epochs_completed"]]
    return last[0] if last and last[0].get("reference") == "selection" else None


def _vae_score(metrics):
    return (metrics.get("validation") or {}).get("nll_importance")


def _vae_cells(metrics):
    validation, test = metrics.get("validation") or {}, metrics.get("test") or {}
    return [_number(validation.get("negative_elbo"), ".2f"),
            _importance_sampled(validation), _importance_sampled(test)]


def _importance_sampled(split):
    return "n/a" if not split else f"{split['nll_importance']:.2f} (K={split['importance_samples']})"


def _gan_score(metrics):
    row = selection_fid(metrics)
    return None if row is None else row["fid"]


def _gan_cells(metrics):
    row = selection_fid(metrics) or {}
    return [_number(row.get("fid"), ".2f"), _number(row.get("precision"), ".3f"),
            _number(row.get("recall"), ".3f"), _number(metrics["evaluation"].get("fid"), ".2f")]


def _nf_score(metrics):
    curve = metrics["curves"].get("val_bpd")
    return curve[-1] if curve else None


def _nf_cells(metrics):
    return [_number(_nf_score(metrics), ".4f"), _number((metrics.get("test") or {}).get("bpd"), ".4f")]


# Per script: the section's title, what its candidates are chosen by (lower is better), the score
# columns and their cells, in the order the columns name them.
SELECTIONS = {
    "a3_vae_template.py": ("VAE", "the validation NLL", _vae_score,
                           ("validation −ELBO", "validation NLL", "test NLL"), _vae_cells),
    "a3_gan_template.py": ("GAN", "the FID against the selection reference (training images)", _gan_score,
                           ("selection FID", "precision", "recall", "test FID"), _gan_cells),
    "a3_nf_template.py": ("RealNVP flow", "the validation bits/dim", _nf_score,
                          ("validation bits/dim", "test bits/dim"), _nf_cells),
    # Beyond the assignment (make extensions), each module a section of its own.
    "extensions/vae_flows.py": ("VAE with a flow posterior (extensions.vae_flows), the flow length",
                                "the validation NLL, each posterior's K against its own", _vae_score,
                                ("validation −ELBO", "validation NLL", "test NLL"), _vae_cells),
    "extensions/nf_couplings.py": ("RealNVP, convolutional couplings (extensions.nf_couplings), the learning "
                                   "rate", "the validation bits/dim", _nf_score,
                                   ("validation bits/dim", "test bits/dim"), _nf_cells),
    "extensions/nf_multiscale.py": ("RealNVP, multi-scale (extensions.nf_multiscale), the learning rate",
                                    "the validation bits/dim", _nf_score,
                                    ("validation bits/dim", "test bits/dim"), _nf_cells),
}
ABLATION_COLUMNS = ("run", "what it measures", "declared: from its base, it sets", "also differs in the run")
TRAILING_COLUMNS = ("chosen", "train time", "commit")


def ablation_cells(name, metrics, experiment, expected, score_cells, chosen=False, shortlisted=False):
    """One row: the run ``name`` of ``experiment`` (its ``metrics``, None before it has run), whose
    settings should be ``expected``, with the ``score_cells`` cells of its scores; ``chosen``: its
    group's choice, ``shortlisted``: the best of a shortlist (see ``deciding_groups``)."""
    head = [f"`{name}`", experiment.note, declared(experiment),
            "n/a" if metrics is None else also_differs(metrics, experiment, expected)]
    if metrics is None:
        return [*head, "not run yet", *["n/a"] * (score_cells - 1 + len(TRAILING_COLUMNS))]
    verdict = "**best shortened run**" if shortlisted else "**chosen**" if chosen else \
        "" if experiment.candidate else "not a candidate"
    return [*head, *SELECTIONS[metrics["script"]][4](metrics), verdict,
            _minutes(metrics["wall_time_s"], metrics["device"]), f"`{str(metrics['git_commit'])[:7]}`"]


def is_default(experiment, declarations):
    """Whether an entry trains its script's DEFAULT settings at seed 42, apart from the settings a
    candidate changes without choosing them (``NOT_CHOSEN``: a shortened run, the test's K)."""
    not_chosen = getattr(declarations, "NOT_CHOSEN", experiments.NOT_CHOSEN)
    default = declarations.expected_settings(dataclasses.replace(experiment, overrides={}, base="default"))
    settings = declarations.expected_settings(experiment)
    compared = (settings.keys() | default.keys()) - set(not_chosen)
    return experiment.seed == 42 and all(settings.get(name) == default.get(name) for name in compared)


def candidate_scores(script, entries, runs):
    """{name: score} of the candidates among ``entries`` (of ``script``) that have run and have a
    score (SELECTIONS: lower is better); ``runs`` maps an entry's name to its metrics, None before it
    has run."""
    score = SELECTIONS[script][2]
    scores = {entry.name: score(runs[entry.name]) for entry in entries
              if entry.candidate and runs.get(entry.name) is not None}
    return {name: value for name, value in scores.items() if value is not None}


def lowest(scores):
    """The name of the lowest of ``scores`` ({name: score}), None when there is none."""
    return min(scores, key=scores.get) if scores else None


def alike(first, second, declarations):
    """Whether two entries train the same settings at the same seed, apart from the settings a candidate
    changes without choosing them (``NOT_CHOSEN``: a shortened run, the test's K)."""
    not_chosen = getattr(declarations, "NOT_CHOSEN", experiments.NOT_CHOSEN)
    settings, other = declarations.expected_settings(first), declarations.expected_settings(second)
    compared = (settings.keys() | other.keys()) - set(not_chosen)
    return first.seed == second.seed and all(settings.get(name) == other.get(name) for name in compared)


def deciding_groups(entries):
    """The groups whose candidates choose a script's settings: those that hold a canonical candidate
    (an entry with an ``out``, seed 42, that competes). Another group of the script that has candidates
    is a shortlist: shortened runs whose best train in full in a deciding group."""
    return {entry.group for entry in entries if entry.out and entry.seed == 42 and entry.candidate}


def trained_in_full(entry, entries, declarations):
    """The candidate of a deciding group (``deciding_groups``) that trains ``entry``'s settings in
    full, when ``entry`` is on a shortlist (a candidate of another group); None otherwise."""
    deciding = deciding_groups(entries)
    if entry.group in deciding or not entry.candidate:
        return None
    return next((other for other in entries if other.group in deciding and other.candidate
                 and alike(entry, other, declarations)), None)


def _verdict(chosen, members, declarations, entries=()):
    """Whether the ``chosen`` candidate of a group (``members``) has the settings its script trains in
    full: those of the group's canonical run (its entry with an ``out``, seed 42) or, without one, the
    script's DEFAULT, apart from the settings a candidate changes without choosing them
    (``NOT_CHOSEN``: a shortened run, the test's K). On a shortlist (see ``deciding_groups``; ``entries``
    are all of the script's), whether it trains in full among the runs that choose."""
    not_chosen = getattr(declarations, "NOT_CHOSEN", experiments.NOT_CHOSEN)
    default = declarations.expected_settings(dataclasses.replace(chosen, overrides={}, base="default"))
    canonical = next((entry for entry in members if entry.out and entry.seed == 42), None)
    if canonical is None and _is_shortlist(members, entries):
        in_full = trained_in_full(chosen, entries, declarations)
        return (f"trained in full as `{in_full.name}`, where the runs in full choose" if in_full else
                "**not** trained in full: the runs in full should have one of its settings")
    reference = default if canonical is None else declarations.expected_settings(canonical)
    settings = declarations.expected_settings(chosen)
    same = chosen.seed == 42 and all(settings.get(name) == reference.get(name)
                                     for name in settings.keys() | reference.keys() if name not in not_chosen)
    if reference == default:
        if not is_default(chosen, declarations):
            return "**not** the default: the script's DEFAULT should take its settings"
        shorter = settings.get("epochs") != reference.get("epochs")
        return "the default" + (f", on a run shortened to {settings['epochs']} epochs" if shorter else "")
    if not same:
        return f"**not** the settings of `{canonical.folder}`: that run should take its settings"
    return f"the settings of `{canonical.folder}`"


def _groups(entries):
    """{group: its entries}, in the order of their first entry."""
    groups = {}
    for entry in entries:
        groups.setdefault(entry.group, []).append(entry)
    return groups


def _choice(script, group, members, runs, declarations, entries=()):
    """(the chosen candidate of a group or None, the sentence that says so); ``entries``: all of the
    script's."""
    scores = candidate_scores(script, members, runs)
    named = f" ({group})" if group else ""
    if not scores:
        return None, f"No candidate{named} has run yet."
    chosen = lowest(scores)
    by_name = {entry.name: entry for entry in members}
    pending = [entry.name for entry in members if entry.candidate and runs[entry.name] is None]
    note = f" ({len(pending)} candidate{'s' if len(pending) > 1 else ''} not run yet)" if pending else ""
    verdict = _verdict(by_name[chosen], members, declarations, entries)
    heading = "Best shortened run" if _is_shortlist(members, entries) else "Chosen"
    return chosen, f"{heading}{named}: `{chosen}`, {verdict}{note}."


def _is_shortlist(members, entries):
    """Whether a group (``members``) is a shortlist: it holds no canonical run while another group of
    the script (``entries``) decides (``deciding_groups``)."""
    deciding = deciding_groups(entries)
    return bool(deciding) and not any(entry.out and entry.seed == 42 for entry in members)


def selection_section(script, entries, runs, declarations):
    """The markdown lines of one script's section: its table, and which candidate its score chooses
    in each group of entries (candidates compete only within their group)."""
    title, _, _, columns, _ = SELECTIONS[script]
    groups = {group: members for group, members in _groups(entries).items()
              if any(entry.candidate for entry in members)}
    choices = {group: _choice(script, group, members, runs, declarations, entries)
               for group, members in groups.items()}
    chosen = {name for name, _ in choices.values() if name is not None}
    shortlisted = {choices[group][0] for group, members in groups.items() if _is_shortlist(members, entries)}
    rows = []
    for entry in entries:
        metrics = runs[entry.name]
        expected = declarations.expected_settings(entry) if metrics is not None else None
        rows.append(ablation_cells(entry.name, metrics, entry, expected, len(columns), entry.name in chosen,
                                   entry.name in shortlisted))
    lines = [f"## {title}: chosen by {SELECTIONS[script][1]}", "",
             *markdown_table((*ABLATION_COLUMNS, *columns, *TRAILING_COLUMNS), rows), ""]
    for _, sentence in choices.values():
        lines += [sentence, ""]
    return lines


def entry_folder(results_dir, entry):
    """The run folder of an entry of experiments.py under ``results_dir`` (its folder is given under
    experiments.RESULTS_DIR)."""
    return Path(results_dir) / entry.folder.relative_to(experiments.RESULTS_DIR)


def write_ablation_table(results_dir, declarations=None):
    """results/ablations.md: one section per model with a row per entry of ``declarations``
    (experiments.py, or a module like it: EXPERIMENTS and expected_settings), in its order, and the
    candidate its selection score chooses; then one row per run folder of results/ablations/ that
    no entry declares. Returns the text."""
    declarations = declarations or experiments
    results_dir = Path(results_dir)
    runs = {}
    for entry in declarations.EXPERIMENTS:
        folder = entry_folder(results_dir, entry)
        runs[entry.name] = read_run(folder) if schema.exists(folder) else None
    lines = ["# Selection experiments, ablations and seed studies", "", ABLATION_INTRO, ""]
    for script in SELECTIONS:
        # The extension's own runs that choose nothing have their tables in results/extensions/.
        entries = [entry for entry in declarations.EXPERIMENTS if entry.script == script and
                   (entry.candidate or entry.suite == "ablations")]
        if entries:
            lines += selection_section(script, entries, runs, declarations)
    declared_names = {entry.name for entry in declarations.EXPERIMENTS}
    undeclared = sorted(path.parent.name for path in (results_dir / "ablations").glob("*/metrics.json")
                        if path.parent.name not in declared_names)
    if undeclared:
        rows = []
        for name in undeclared:
            metrics = read_run(results_dir / "ablations" / name)
            rows.append([f"`{name}`", metrics["script"], _minutes(metrics["wall_time_s"], metrics["device"]),
                         f"`{str(metrics['git_commit'])[:7]}`"])
        lines += ["## Runs no entry of experiments.py declares", "",
                  *markdown_table(("run", "script", "train time", "commit"), rows), ""]
    text = "\n".join(lines).rstrip("\n") + "\n"
    write_text_if_changed(results_dir / "ablations.md", text)
    return text


# ---------------------------------------------------------------- the command

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m report.tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("tables", nargs="*", metavar="TABLE",
                        help=f"which to write: {', '.join(TABLES)} (default: all)")
    parser.add_argument("--results", default="results", help="folder of the runs (default results)")
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT, help="MNIST, for the real-data rows")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where to score the real-data rows when they are not cached")
    args = parser.parse_args(argv)
    if unknown := sorted(set(args.tables) - set(TABLES)):
        parser.error(f"no table {', '.join(unknown)}: choose from {', '.join(TABLES)}")
    chosen = args.tables or TABLES
    results = Path(args.results)
    if "comparison" in chosen:
        references = reference_rows(args.data_root, get_device(args.device), results / "reference.json")
        write_table(results, references)
        print((results / "comparison.md").read_text())
        print(f"wrote {results}/comparison.{{md,json}} and precision_recall.{{png,pdf}}")
    if "ablations" in chosen:
        write_ablation_table(results)
        print(f"wrote {results}/ablations.md")
    if "extensions" in chosen:
        from report import extension_tables  # here: it imports this module's readers
        extension_tables.write_all(results / "extensions", results / "nf",
                                   required="extensions" in args.tables)


if __name__ == "__main__":
    cli(main)
