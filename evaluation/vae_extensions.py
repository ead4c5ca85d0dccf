"""Question 1.8 with flow posteriors: the VAE extension runs of ``make extensions-vae`` side by side.

    python -m evaluation.vae_extensions                 # reads results/extensions/vae_*/metrics.json

Pushing the ELBO up raises log p(x) and/or shrinks KL(q(z|x) || p(z|x)), the gap between the negative
ELBO and the negative log-likelihood. A richer posterior (planar flows, IAF) or a tighter training
bound (the importance-weighted bound) should shrink that gap. Writes into the same folder
``vae_extensions.md`` (one row a run: setting, training time, test negative ELBO and NLL, their gap)
and the figure ``vae_extensions`` (PNG + PDF): test negative ELBO (dashed) and NLL (solid) against
the flow length K, the Gaussian posterior at K = 0, one line per posterior and training bound.
"""

import argparse
import json
from pathlib import Path

import matplotlib.pyplot as plt

from common import atomic_write, save_figure

COLUMNS = ("run", "posterior", "flow steps K", "IW samples k", "epochs", "train time (min)",
           "test −ELBO", "test NLL", "gap", "NLL samples", "data")


def load_rows(folder):
    """One dict a run in ``folder``/vae_*/metrics.json, sorted by posterior, k and K. Every row must
    have estimated its NLL with the same number of importance samples, or the rows do not compare."""
    rows = []
    for path in sorted(Path(folder).glob("vae_*/metrics.json")):
        metrics = json.loads(path.read_text())
        args = metrics["args"]
        posterior = args.get("posterior", "gaussian")
        rows.append({
            "run": path.parent.name,
            "posterior": posterior,
            "flow_steps": 0 if posterior == "gaussian" else args["flow_steps"],
            "iw_samples": args.get("iw_samples", 1),
            "epochs": metrics["epochs_completed"],
            "train_minutes": metrics["wall_time_s"] / 60,
            "negative_elbo": metrics["test"]["negative_elbo"],
            "nll": metrics["test"]["nll_importance"],
            "importance_samples": metrics["test"]["importance_samples"],
            "data": metrics.get("data", {}).get("binarized_mnist", "reproduction"),
        })
    if not rows:
        raise SystemExit(f"error: no {folder}/vae_*/metrics.json: run `make extensions-vae` first")
    samples = {row["importance_samples"] for row in rows}
    if len(samples) > 1:
        raise SystemExit(f"error: the runs estimate their NLL with different K ({sorted(samples)}): "
                         "re-evaluate them with one --importance_samples")
    return sorted(rows, key=lambda row: (row["posterior"] != "gaussian", row["posterior"],
                                         row["iw_samples"], row["flow_steps"]))


def write_table(rows, path):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in rows:
        cells = (row["run"], row["posterior"], row["flow_steps"] or "–", row["iw_samples"], row["epochs"],
                 f"{row['train_minutes']:.1f}", f"{row['negative_elbo']:.2f}", f"{row['nll']:.2f}",
                 f"{row['negative_elbo'] - row['nll']:.2f}", row["importance_samples"], row["data"])
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    note = ("\nTest set, nats per image. NLL: importance-sampled negative log-likelihood; gap = −ELBO − NLL, "
            "an estimate of KL(q(z|x) || p(z|x)). k = 1 trains on the ELBO, k > 1 on the importance-"
            "weighted bound.\n")
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n" + note))


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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m evaluation.vae_extensions",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="results/extensions",
                        help="folder of the vae_* runs (default results/extensions)")
    args = parser.parse_args(argv)
    rows = load_rows(args.results)
    write_table(rows, Path(args.results) / "vae_extensions.md")
    save_plot(rows, Path(args.results) / "vae_extensions")
    print(f"{len(rows)} runs: {Path(args.results) / 'vae_extensions'}.{{md,png,pdf}}")


if __name__ == "__main__":
    main()
