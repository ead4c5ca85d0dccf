"""The runs of ``make extensions`` side by side: tables and figures in results/extensions/, written by
``python -m report.tables extensions`` (and by ``python -m report.tables``).

VAE (question 1.8 with flow posteriors and the importance-weighted bound, ``extensions.vae_flows``):
pushing the ELBO up raises log p(x) and/or shrinks KL(q(z|x) || p(z|x)), the gap between the negative
ELBO and the negative log-likelihood. A richer posterior (planar flows, IAF) or a tighter training
bound (the importance-weighted bound of k samples, its gradient IWAE's or DReG's) should shrink that
gap. ``vae_extensions.md`` has a row a setting (posterior, flow_steps, iw_samples, iw_estimator): runs
that differ only in their seed share a row, which lists each seed's training time, test negative ELBO,
NLL and gap. The figure ``vae_extensions`` (PNG + PDF) has three panels: test negative ELBO (dashed)
and NLL (solid) against the flow length K (the Gaussian posterior at K = 0, a line per posterior);
then test NLL, and the gap, against the bound's k for the Gaussian posterior trained with IWAE's and
with DReG's gradient, the flow posteriors (k = 1) as reference markers. A point of several seeds is
their mean, with a bar over their range.

Flow (RealNVP's convolutional couplings and multi-scale architecture, Flow++'s variational
dequantization: ``extensions.nf_couplings``, ``extensions.nf_multiscale``): ``nf_extensions.md`` has a
row a run, the answer's MLP run of results/nf/ first (architecture, dequantization, parameters,
training time, test bits/dim of the one-sample bound and importance-weighted over the noise, FID,
precision, recall); the figure ``nf_extensions`` draws every run's validation bits/dim against its
training minutes, and ``nf_samples`` puts each run's last sample grid (the PNG of its ``samples_end``
figure) side by side.

Both tables say which settings the selection entries of experiments.py chose on validation.

Every run is read through ``harness.schema.read`` (``report.tables.read_run``); what a run changes is
read from its recorded settings and script. To add an extension run: train it into
results/extensions/vae_<name>/ or nf_<name>/ (``make extensions``); it gets its row and line here, and
its row in the comparison. To add a column: read the run's key in ``load_rows`` / ``flow_row`` and add
it to COLUMNS / NF_COLUMNS and its cell in ``write_table`` / ``write_flow_table``.
"""

import json
from pathlib import Path

import matplotlib.image as mpimg
import matplotlib.pyplot as plt

import experiments
from harness import RunError, save_figure
from harness.files import write_text_if_changed
from report.tables import markdown_table, read_run

COLUMNS = ("run", "posterior", "flow steps K", "IW samples k", "estimator", "seeds", "epochs",
           "train time (min)", "test −ELBO", "test NLL", "gap", "NLL samples", "data")
# The measures of a row, one value per seed.
MEASURES = ("train_minutes", "negative_elbo", "nll", "gap")
# Every panel draws a posterior (and the Gaussian with DReG's gradient) in one colour.
COLORS = {("gaussian", "iwae"): "C0", ("planar", "iwae"): "C1", ("iaf", "iwae"): "C2",
          ("gaussian", "dreg"): "C3"}
FLOW_MARKERS = {"planar": "s", "iaf": "^"}
VAE_SCRIPTS = ("extensions/vae_flows.py",)
NF_SCRIPTS = ("extensions/nf_couplings.py", "extensions/nf_multiscale.py")


# ---------------------------------------------------------------- what was chosen on validation

def _text(value):
    return format(value, "g") if isinstance(value, float) else str(value)


def chosen_on_validation(scripts, declarations=experiments):
    """In words, what the selection entries of ``declarations`` (experiments.py) choose among for
    ``scripts``: per group of candidates (or script, named by its module), each setting they vary and
    its values, and the length of their runs where they all share one; "" without candidates."""
    not_chosen = set(getattr(declarations, "NOT_CHOSEN", experiments.NOT_CHOSEN))
    parts = []
    for script in scripts:
        groups = {}
        for entry in declarations.EXPERIMENTS:
            if entry.script == script and entry.candidate:
                groups.setdefault(entry.group, []).append(entry.overrides)
        for group, overrides in groups.items():
            names = sorted({name for changes in overrides for name in changes} - not_chosen)
            varied = []
            for name in names:
                values = [changes.get(name) for changes in overrides]
                if len({_text(value) for value in values}) > 1:
                    shown = sorted({value for value in values if value is not None})
                    texts = [_text(value) for value in shown]
                    varied.append(f"{name} {', '.join(texts[:-1])} or {texts[-1]}")
            epochs = {changes.get("epochs") for changes in overrides}
            length = f" on runs of {epochs.pop()} epochs" if len(epochs) == 1 and None not in epochs else ""
            parts.append(f"for {group or Path(script).stem}, {', '.join(varied)}{length}")
    return "; ".join(parts)


def selection_sentence(scripts, criterion, declarations=experiments):
    chosen = chosen_on_validation(scripts, declarations)
    if not chosen:
        return ""
    return (f" The settings are chosen on validation, by {criterion} and never by these test numbers, "
            f"among the candidates of experiments.py (`make ablations`; results/ablations.md shows their "
            f"scores and the choice): {chosen}.")


# ---------------------------------------------------------------- VAE

def load_rows(folder):
    """One dict a run in ``folder``/vae_*/, sorted by posterior, k, estimator, K and seed (42 first).
    Every row must have estimated its NLL with the same number of importance samples, or the rows do
    not compare."""
    rows = []
    for path in sorted(Path(folder).glob("vae_*/metrics.json")):
        metrics = read_run(path.parent)
        settings, test = metrics["settings"], metrics["test"]
        posterior = settings["posterior"]
        rows.append({
            "run": path.parent.name,
            "seed": metrics["seed"],
            "settings": settings,
            "posterior": posterior,
            "flow_steps": 0 if posterior == "gaussian" else settings["flow_steps"],
            "iw_samples": settings["iw_samples"],
            # runs from before the estimator was a setting trained with IWAE's gradient
            "estimator": settings.get("iw_estimator", "iwae"),
            "epochs": metrics["epochs_completed"],
            "train_minutes": metrics["wall_time_s"] / 60,
            "negative_elbo": test["negative_elbo"],
            "nll": test["nll_importance"],
            "gap": test["negative_elbo"] - test["nll_importance"],
            "importance_samples": test["importance_samples"],
            "data": (metrics.get("data") or {}).get("binarized_mnist", "n/a"),
        })
    samples = {row["importance_samples"] for row in rows}
    if len(samples) > 1:
        raise RunError(f"the runs in {folder} estimate their NLL with different K ({sorted(samples)}): "
                       "re-evaluate them with one importance_samples")
    return sorted(rows, key=lambda row: (row["posterior"] != "gaussian", row["posterior"], row["iw_samples"],
                                         row["estimator"] != "iwae", row["estimator"], row["flow_steps"],
                                         row["seed"] != 42, row["seed"]))


def seed_groups(rows):
    """The rows of ``load_rows`` that differ only in their seed (the same recorded settings, epochs
    and data) as one row each, in their order: the shared settings, and "runs", "seeds" and each of
    MEASURES as lists, the seed-42 run first."""
    groups = {}
    for row in rows:
        key = json.dumps([row["settings"], row["epochs"], row["data"]], sort_keys=True)
        groups.setdefault(key, []).append(row)
    merged = []
    for members in groups.values():
        first = members[0]
        shared = {key: value for key, value in first.items() if key not in (*MEASURES, "run", "seed")}
        per_seed = {key: [row[key] for row in members] for key in (*MEASURES, "run", "seed")}
        merged.append({**shared, **{measure: per_seed[measure] for measure in MEASURES},
                       "runs": per_seed["run"], "seeds": per_seed["seed"]})
    return merged


def _per_seed(values, spec):
    """Each seed's value, in the order of the seeds column."""
    return " / ".join(format(value, spec) for value in values)


def _mean(values):
    return sum(values) / len(values)


def _half_range(values):
    return (max(values) - min(values)) / 2


def write_table(rows, path, declarations=experiments):
    cells = []
    for row in seed_groups(rows):
        estimator = row["estimator"] if row["iw_samples"] > 1 or row["estimator"] != "iwae" else "–"
        cells.append((", ".join(row["runs"]), row["posterior"], row["flow_steps"] or "–", row["iw_samples"],
                      estimator, ", ".join(str(seed) for seed in row["seeds"]), row["epochs"],
                      _per_seed(row["train_minutes"], ".1f"), _per_seed(row["negative_elbo"], ".2f"),
                      _per_seed(row["nll"], ".2f"), _per_seed(row["gap"], ".2f"), row["importance_samples"],
                      row["data"]))
    note = ("\nTest set, nats per image. NLL: importance-sampled negative log-likelihood; gap = −ELBO − NLL, "
            "an estimate of KL(q(z|x) || p(z|x)). k = 1 trains on the ELBO, k > 1 on the importance-"
            "weighted bound, its gradient IWAE's (Burda et al., 2016) or DReG's (Tucker et al., 2019). A "
            "row of several seeds lists each seed's value in the order of its seeds column: their "
            "difference is the spread to read the other rows' differences against. Read the "
            "importance-weighted rows (Gaussian posterior, k > 1) against the flow posteriors' (k = 1) "
            "at their training times: what the tighter bound buys against the richer posterior at equal "
            "training time." + selection_sentence(VAE_SCRIPTS, "the validation NLL", declarations) + "\n")
    write_text_if_changed(path, "\n".join(markdown_table(COLUMNS, cells)) + "\n" + note)


def series(groups):
    """{(posterior, k, estimator): [(K, group), ...]} of ``seed_groups``' rows: every flow line starts
    at the Gaussian row of the same k and estimator (a flow of zero steps is the Gaussian), if there
    is one."""
    lines = {}
    for group in groups:
        lines.setdefault((group["posterior"], group["iw_samples"], group["estimator"]), []).append(
            (group["flow_steps"], group))
    for (posterior, k, estimator), points in lines.items():
        if posterior != "gaussian" and ("gaussian", k, estimator) in lines:
            points.insert(0, lines[("gaussian", k, estimator)][0])
    return lines


def k_series(groups):
    """{estimator: [(k, group), ...]} of the Gaussian posterior's rows, by k: the k axis of the figure."""
    lines = {}
    for group in groups:
        if group["posterior"] == "gaussian":
            lines.setdefault(group["estimator"], []).append((group["iw_samples"], group))
    return {estimator: sorted(points, key=lambda point: point[0]) for estimator, points in lines.items()}


def _errorbar(ax, xs, groups, measure, **style):
    """Each group's mean of ``measure`` at xs, a bar over its seeds' range where it has several."""
    means = [_mean(group[measure]) for group in groups]
    spread = [_half_range(group[measure]) for group in groups]
    return ax.errorbar(xs, means, yerr=spread if any(spread) else None, capsize=2, markersize=3, **style)


def _estimator_label(estimator):
    return {"iwae": "IWAE", "dreg": "DReG"}.get(estimator, estimator)


def save_plot(rows, stem):
    groups = seed_groups(rows)
    fig, (by_steps, nll_by_k, gap_by_k) = plt.subplots(1, 3, figsize=(7.4, 2.6), layout="constrained")
    for (posterior, k, estimator), points in series(groups).items():
        if posterior == "gaussian" and k > 1:
            continue  # on the k axis
        color = COLORS.get((posterior, estimator), "C4")
        steps = [K for K, _ in points]
        label = posterior if k == 1 and estimator == "iwae" else \
            f"{posterior}, IW k={k} ({_estimator_label(estimator)})"
        members = [group for _, group in points]
        _errorbar(by_steps, steps, members, "nll", marker="o", color=color, label=label)
        _errorbar(by_steps, steps, members, "negative_elbo", marker="o", linestyle="--", color=color,
                  markerfacecolor="none")
    by_steps.plot([], [], color="gray", label="NLL")
    by_steps.plot([], [], color="gray", linestyle="--", label="−ELBO")
    by_steps.set_xlabel("flow steps K (0: Gaussian)")
    by_steps.set_ylabel(f"test nats (NLL: K_IS = {rows[0]['importance_samples']})")
    by_steps.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.3))  # below: off the points
    ks = set()
    for ax, measure, name in ((nll_by_k, "nll", "test NLL (nats)"),
                              (gap_by_k, "gap", "gap −ELBO − NLL (nats)")):
        for estimator, points in k_series(groups).items():
            ks.update(k for k, _ in points)
            _errorbar(ax, [k for k, _ in points], [group for _, group in points], measure, marker="o",
                      color=COLORS.get(("gaussian", estimator), "C4"),
                      label=f"Gaussian, {_estimator_label(estimator)}")
        for group in groups:  # the flow posteriors trained on the ELBO, for reference
            if group["posterior"] != "gaussian" and group["iw_samples"] == 1 and group["estimator"] == "iwae":
                ks.add(1)
                _errorbar(ax, [1], [group], measure, marker=FLOW_MARKERS.get(group["posterior"], "D"),
                          linestyle="none", color=COLORS.get((group["posterior"], "iwae"), "C4"),
                          markerfacecolor="none",
                          label=f"{group['posterior']} K={group['flow_steps']}, k = 1")
        ax.set_xscale("log")
        ax.set_xticks(sorted(ks), [str(k) for k in sorted(ks)])
        ax.minorticks_off()
        ax.set_xlabel("k, samples of the training bound")
        ax.set_ylabel(name)
    nll_by_k.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    for ax in (by_steps, nll_by_k, gap_by_k):
        ax.grid(alpha=0.3)
    save_figure(fig, stem)


# ---------------------------------------------------------------- flow

NF_COLUMNS = ("run", "architecture", "dequantization", "parameters", "epochs", "train time (min)",
              "test bits/dim", "test bits/dim, IW", "noise samples S", "FID", "precision", "recall")


def architecture(metrics):
    """The flow a run trained, from its script (the multi-scale flow's settings have no coupling)."""
    if metrics["script"] == "extensions/nf_multiscale.py":
        return "multi-scale"
    coupling = metrics["settings"].get("coupling", "mlp")  # the answer's flow has MLP couplings
    return f"{'MLP' if coupling == 'mlp' else coupling} couplings"


def flow_row(run_dir):
    run_dir = Path(run_dir)
    metrics = read_run(run_dir)
    test, curves, evaluation = metrics["test"], metrics["curves"], metrics["evaluation"]
    stem = (metrics.get("figures") or {}).get("samples_end")
    return {
        "run": run_dir.name, "architecture": architecture(metrics),
        "dequantization": metrics["settings"].get("dequantization", "uniform"),
        "n_params": metrics["n_params"], "epochs": metrics["epochs_completed"],
        "train_minutes": metrics["wall_time_s"] / 60, "bpd": test["bpd"],
        "bpd_iw": test.get("bpd_importance_weighted"), "noise_samples": test.get("noise_samples"),
        **{key: evaluation.get(key) for key in ("fid", "precision", "recall")},
        "minutes": [seconds / 60 for seconds in curves["wall_time_s"]], "val_bpd": curves["val_bpd"],
        "samples": None if stem is None else run_dir / f"{stem}.png",
    }


def load_flow_rows(folder, canonical):
    """One dict a flow run: ``canonical`` (the answer's MLP run of ``make results``), then
    ``folder``/nf_*/, each described by its recorded script and settings."""
    runs = [Path(canonical)] if (Path(canonical) / "metrics.json").exists() else []
    runs += sorted(path.parent for path in Path(folder).glob("nf_*/metrics.json"))
    return [flow_row(run) for run in runs]


def _cell(value, spec):
    return "–" if value is None else format(value, spec)


def write_flow_table(rows, path, declarations=experiments):
    cells = [(row["run"], row["architecture"], row["dequantization"], f"{row['n_params']:,}", row["epochs"],
              f"{row['train_minutes']:.1f}", f"{row['bpd']:.4f}", _cell(row["bpd_iw"], ".4f"),
              row["noise_samples"] or "–", _cell(row["fid"], ".2f"), _cell(row["precision"], ".3f"),
              _cell(row["recall"], ".3f"))
             for row in rows]
    note = ("\nTest set, bits per dimension of the dequantized image (lower is better). \"test bits/dim\" is "
            "the one-sample bound −E_q[log p(x + u) − log q(u | x)]; \"IW\" the importance-weighted "
            "estimate over S draws of the noise, −log (1/S) Σ_s p(x + u_s) / q(u_s | x), which compares "
            "uniform (q = 1) and variational dequantization on the same footing. FID, precision and "
            "recall: the samples' measures of results/comparison.md (10,000 samples, the digit "
            "classifier's features)."
            + selection_sentence(NF_SCRIPTS, "the validation bits/dim", declarations) + "\n")
    write_text_if_changed(path, "\n".join(markdown_table(NF_COLUMNS, cells)) + "\n" + note)


def _flow_label(row):
    return f"{row['architecture']}, {row['dequantization']}"


def save_flow_plot(rows, stem):
    fig, ax = plt.subplots(figsize=(3.6, 2.6), layout="constrained")
    for row in rows:
        label = f"{_flow_label(row)} ({row['n_params'] / 1e6:.2g}M)"
        line, = ax.plot(row["minutes"], row["val_bpd"], marker="o", markersize=2.5, label=label)
        ax.plot(row["minutes"][-1], row["bpd"], marker="*", markersize=7, color=line.get_color(),
                linestyle="none")
    ax.plot([], [], marker="*", color="gray", linestyle="none", label="test, at the end")
    ax.set_xlabel("training time (min)")
    ax.set_ylabel("validation bits/dim")
    high = min(2.0, max(max(row["val_bpd"]) for row in rows))
    low = min(min(row["val_bpd"] + [row["bpd"]]) for row in rows)
    ax.set_ylim(low - 0.03, high + 0.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    save_figure(fig, stem)


def save_samples_figure(rows, stem):
    """Each run's last sample grid (its samples_end PNG) side by side, titled by its architecture and
    dequantization; a run without the PNG is left out, and without any no figure is drawn. Returns
    the runs drawn."""
    shown = [row for row in rows if row["samples"] is not None and row["samples"].is_file()]
    if not shown:
        return []
    fig, axes = plt.subplots(1, len(shown), figsize=(1.8 * len(shown), 2.1), squeeze=False,
                             layout="constrained")
    for ax, row in zip(axes[0], shown, strict=True):
        ax.imshow(mpimg.imread(row["samples"]), interpolation="nearest")
        ax.set_title(f"{row['architecture']},\n{row['dequantization']}", fontsize=7)
        ax.axis("off")
    save_figure(fig, stem)
    return [row["run"] for row in shown]


def write_all(folder, canonical_nf, required=False):
    """The tables and figures of the extension runs in ``folder`` (the flows beside the answer's run in
    ``canonical_nf``); with ``required``, no extension run at all is an error."""
    folder = Path(folder)
    rows, flow_rows = load_rows(folder), load_flow_rows(folder, canonical_nf)
    if not rows and not flow_rows:
        if required:
            raise RunError(f"no runs in {folder}: run `make extensions` first")
        print(f"no runs in {folder}: no extension tables written")
        return
    if rows:
        write_table(rows, folder / "vae_extensions.md")
        save_plot(rows, folder / "vae_extensions")
    if flow_rows:
        write_flow_table(flow_rows, folder / "nf_extensions.md")
        save_flow_plot(flow_rows, folder / "nf_extensions")
        save_samples_figure(flow_rows, folder / "nf_samples")
    print(f"{len(rows)} VAE and {len(flow_rows)} flow runs: {folder}/{{vae,nf}}_extensions.{{md,png,pdf}}, "
          f"{folder}/nf_samples.{{png,pdf}}")
