"""The runs of ``make extensions`` side by side: tables and figures in results/extensions/, written by
``python -m report.tables extensions`` (and by ``python -m report.tables``).

VAE (question 1.8 with flow posteriors, ``extensions.vae_flows``): pushing the ELBO up raises log p(x)
and/or shrinks KL(q(z|x) || p(z|x)), the gap between the negative ELBO and the negative log-likelihood.
A richer posterior (planar flows, IAF) or a tighter training bound (the importance-weighted bound)
should shrink that gap. ``vae_extensions.md`` has a row a run (its settings posterior, flow_steps and
iw_samples, training time, test negative ELBO and NLL, their gap); the figure ``vae_extensions``
(PNG + PDF) draws test negative ELBO (dashed) and NLL (solid) against the flow length K, the Gaussian
posterior at K = 0, one line per posterior and training bound.

Flow (RealNVP's convolutional couplings and Flow++'s variational dequantization,
``extensions.nf_couplings``): ``nf_extensions.md`` has a row a run, the answer's MLP run of results/nf/
first (parameters, training time, test bits/dim of the one-sample bound and importance-weighted over
the noise); the figure ``nf_extensions`` draws validation bits/dim against training minutes.

Every run is read through ``harness.schema.read`` (``report.tables.read_run``); what a run changes is
read from its recorded settings. To add an extension run: train it into results/extensions/vae_<name>/
or nf_<name>/ (``make extensions``); it gets its row and line here, and its row in the comparison. To
add a column: read the run's key in ``load_rows`` / ``load_flow_rows`` and add it to COLUMNS /
NF_COLUMNS and its cell in ``write_table`` / ``write_flow_table``.
"""

from pathlib import Path

import matplotlib.pyplot as plt

from harness import RunError, save_figure
from harness.files import write_text_if_changed
from report.tables import markdown_table, read_run

COLUMNS = ("run", "posterior", "flow steps K", "IW samples k", "epochs", "train time (min)",
           "test −ELBO", "test NLL", "gap", "NLL samples", "data")
# The answer file's flow, which has no such settings: MLP couplings on uniformly dequantized images.
ANSWER_FLOW = {"coupling": "mlp", "dequantization": "uniform"}


def load_rows(folder):
    """One dict a run in ``folder``/vae_*/, sorted by posterior, k and K. Every row must have estimated
    its NLL with the same number of importance samples, or the rows do not compare."""
    rows = []
    for path in sorted(Path(folder).glob("vae_*/metrics.json")):
        metrics = read_run(path.parent)
        settings, test = metrics["settings"], metrics["test"]
        posterior = settings["posterior"]
        rows.append({
            "run": path.parent.name,
            "posterior": posterior,
            "flow_steps": 0 if posterior == "gaussian" else settings["flow_steps"],
            "iw_samples": settings["iw_samples"],
            "epochs": metrics["epochs_completed"],
            "train_minutes": metrics["wall_time_s"] / 60,
            "negative_elbo": test["negative_elbo"],
            "nll": test["nll_importance"],
            "importance_samples": test["importance_samples"],
            "data": (metrics.get("data") or {}).get("binarized_mnist", "n/a"),
        })
    samples = {row["importance_samples"] for row in rows}
    if len(samples) > 1:
        raise RunError(f"the runs in {folder} estimate their NLL with different K ({sorted(samples)}): "
                       "re-evaluate them with one importance_samples")
    return sorted(rows, key=lambda row: (row["posterior"] != "gaussian", row["posterior"],
                                         row["iw_samples"], row["flow_steps"]))


def write_table(rows, path):
    cells = []
    for row in rows:
        cells.append((row["run"], row["posterior"], row["flow_steps"] or "–", row["iw_samples"],
                      row["epochs"], f"{row['train_minutes']:.1f}", f"{row['negative_elbo']:.2f}",
                      f"{row['nll']:.2f}",
                      f"{row['negative_elbo'] - row['nll']:.2f}", row["importance_samples"], row["data"]))
    note = ("\nTest set, nats per image. NLL: importance-sampled negative log-likelihood; gap = −ELBO − NLL, "
            "an estimate of KL(q(z|x) || p(z|x)). k = 1 trains on the ELBO, k > 1 on the importance-"
            "weighted bound.\n")
    write_text_if_changed(path, "\n".join(markdown_table(COLUMNS, cells)) + "\n" + note)


def series(rows):
    """{(posterior, k): [(K, row), ...]}: every flow line starts at its Gaussian row of the same k
    (a flow of zero steps is the Gaussian), if there is one."""
    lines = {}
    for row in rows:
        lines.setdefault((row["posterior"], row["iw_samples"]), []).append((row["flow_steps"], row))
    for (posterior, k), points in lines.items():
        if posterior != "gaussian" and ("gaussian", k) in lines:
            points.insert(0, lines[("gaussian", k)][0])
    return lines


def save_plot(rows, stem):
    fig, ax = plt.subplots(figsize=(3.3, 2.6), layout="constrained")
    for (posterior, k), points in series(rows).items():
        steps = [K for K, _ in points]
        label = posterior if k == 1 else f"{posterior}, IW k={k}"
        line, = ax.plot(steps, [row["nll"] for _, row in points], marker="o", markersize=3, label=label)
        ax.plot(steps, [row["negative_elbo"] for _, row in points], marker="o", markersize=3,
                linestyle="--", color=line.get_color(), markerfacecolor="none")
    ax.plot([], [], color="gray", label="NLL")
    ax.plot([], [], color="gray", linestyle="--", label="−ELBO")
    ax.set_xlabel("flow steps K (0: Gaussian posterior)")
    ax.set_ylabel(f"test nats (NLL: K_IS = {rows[0]['importance_samples']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    save_figure(fig, stem)


# ---------------------------------------------------------------- flow

NF_COLUMNS = ("run", "coupling", "dequantization", "parameters", "epochs", "train time (min)",
              "test bits/dim", "test bits/dim, IW", "noise samples S")


def flow_row(run_dir, coupling, dequantization):
    metrics = read_run(run_dir)
    test, curves = metrics["test"], metrics["curves"]
    return {
        "run": Path(run_dir).name, "coupling": coupling, "dequantization": dequantization,
        "n_params": metrics["n_params"], "epochs": metrics["epochs_completed"],
        "train_minutes": metrics["wall_time_s"] / 60, "bpd": test["bpd"],
        "bpd_iw": test.get("bpd_importance_weighted"), "noise_samples": test.get("noise_samples"),
        "minutes": [seconds / 60 for seconds in curves["wall_time_s"]], "val_bpd": curves["val_bpd"],
    }


def load_flow_rows(folder, canonical):
    """One dict a flow run: ``canonical`` (the answer's MLP run of ``make results``), then
    ``folder``/nf_*/, whose coupling and dequantization are their recorded settings."""
    rows = []
    if (Path(canonical) / "metrics.json").exists():
        rows.append(flow_row(canonical, **ANSWER_FLOW))
    for path in sorted(Path(folder).glob("nf_*/metrics.json")):
        settings = read_run(path.parent)["settings"]
        rows.append(flow_row(path.parent, settings["coupling"], settings["dequantization"]))
    return rows


def write_flow_table(rows, path):
    cells = [(row["run"], row["coupling"], row["dequantization"], f"{row['n_params']:,}", row["epochs"],
              f"{row['train_minutes']:.1f}", f"{row['bpd']:.4f}",
              "–" if row["bpd_iw"] is None else f"{row['bpd_iw']:.4f}", row["noise_samples"] or "–")
             for row in rows]
    note = ("\nTest set, bits per dimension of the dequantized image (lower is better). \"test bits/dim\" is "
            "the one-sample bound −E_q[log p(x + u) − log q(u | x)]; \"IW\" the importance-weighted "
            "estimate over S draws of the noise, −log (1/S) Σ_s p(x + u_s) / q(u_s | x), which compares "
            "uniform (q = 1) and variational dequantization on the same footing.\n")
    write_text_if_changed(path, "\n".join(markdown_table(NF_COLUMNS, cells)) + "\n" + note)


def save_flow_plot(rows, stem):
    fig, ax = plt.subplots(figsize=(3.3, 2.4), layout="constrained")
    for row in rows:
        label = f"{row['coupling']}, {row['dequantization']} ({row['n_params'] / 1e6:.2g}M)"
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
    print(f"{len(rows)} VAE and {len(flow_rows)} flow runs: {folder}/{{vae,nf}}_extensions.{{md,png,pdf}}")
