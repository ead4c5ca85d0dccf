"""Turn the runs' results into LaTeX, so that no number in the report is typed by hand.

    python report/make_numbers.py [--results results] [--out report/generated]

Reads the canonical runs, results/{vae,vae_z2,gan,nf}/metrics.json (the default configurations that
`make results` trains), the runs of the selection experiments that experiments.py declares (each
entry's folder: results/ablations/<name>/metrics.json, or the canonical run it names; no other folder
of results/ablations/ is read), the runs beyond the assignment that `make extensions` trains,
results/extensions/<name>/metrics.json, and results/reference.json (random subsets of real images
measured like samples, mean and standard deviation). Every run is read through
``report.tables.read_run`` (``harness.schema.read``, with the evaluation that results/comparison.md
shows: metrics.json's, or a newer evaluation.json beside it); settings come from the run's recorded
"settings", the epochs its figures show from its "milestones" and the figures' file names from its
"figures". Writes into --out:
  numbers.tex           one \\newcommand per number, e.g. \\VaeTestNegElbo
  comparison_table.tex  the rows of the model comparison table (question 4.1): size, epochs, likelihood
  comparison_samples.tex  its rows of sample measures, with the real images' mean and sd
  ext_vae_table.tex     the rows of the VAE extensions' table (flow posteriors)
  ext_nf_table.tex      the rows of the flow extensions' table (conv couplings, variational noise)
  gan_progress.tex      the rows of the GAN's sample measures during training (question 2.6)
  vae_naive_mc.tex      the rows of the naive Monte-Carlo study (question 1.4)
  select_vae.tex        the rows of the VAE's selection experiments: what each entry adds, validation
                        negative ELBO and NLL, and which is chosen
  select_gan.tex        the GAN's: FID, precision and recall against the selection reference at the
                        last epoch, the chosen one and the seed studies
  select_nf.tex         the flow's: validation bits/dim of the shortened runs, the chosen one
Each model's candidates are scored as report.tables scores them for results/ablations.md (its
SELECTIONS, on held-out data, never the test set); the lowest score is chosen once every candidate
has one (before that, the choice prints as ??, as does a row whose run has not been made).
A number whose source is missing (no run yet, or a metrics.json of another schema) prints as a bold
?? in the PDF, with a warning here, so that the report always builds, also before (or without) the
training runs. Files are rewritten only when their content changes.

To add a model: add its run to RUNS (canonical) or an entry to experiments.py, its macros to NUMBERS
(training_numbers, evaluation_numbers and yardstick_numbers give the common ones) and, if the report's
comparison shows it, a row to MODELS. To add a metric of the yardstick: a Number in evaluation_numbers or
yardstick_numbers (one macro per model), and a cell in yardstick_cells if the comparison table shows it.
"""

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import a3_nf_template  # noqa: E402
import experiments  # noqa: E402
from evaluation import MEMORISED_QUANTILE  # noqa: E402
from harness.files import write_text_if_changed  # noqa: E402
from harness.schema import SchemaError  # noqa: E402
from report import tables  # noqa: E402

PLACEHOLDER = r"\textbf{??}"
# Stands in for a missing epoch in a figure's file name: plain text, so the figure shows as missing.
MISSING_TAG = "NNN"
# The VAE's figures that report.tex includes as <kind>_epoch\Vae<Moment>Tag.pdf: {macro: moment}.
VAE_FIGURE_TAGS = {"VaeHalfwayTag": "halfway", "VaeFinalTag": "end"}
# The canonical runs, each in results/<run>/.
RUNS = ("vae", "vae_z2", "gan", "nf")
# The selection experiments (experiments.py), per script: the generated file of its table rows and
# the prefix of its macros. Their runs are known here by their entries' names.
SELECTION_TABLES = {experiments.VAE: ("select_vae.tex", "Vae"), experiments.GAN: ("select_gan.tex", "Gan"),
                    experiments.NF: ("select_nf.tex", "Nf")}
# The entries whose numbers the prose cites, per macro prefix: the template's training and the default.
TEMPLATE_ENTRIES = {"Vae": "vae_template", "Gan": "gan_template", "Nf": "nf_template"}
DEFAULT_ENTRIES = {"Vae": "vae_default", "Gan": "gan_default"}
# The last column of a selection table, for the entries that do not compete.
SEED_STUDY, NO_CANDIDATE, CHOSEN = "seed study", "not a candidate", r"\textbf{chosen}"
TRAINED_IN_FULL = "trained in full"  # a shortened candidate whose settings also train in full
# The runs of `make extensions`, each in results/extensions/<name>/ and known here as
# "extensions/<name>": the VAE with the Gaussian posterior and planar and IAF flow posteriors (all
# 80 epochs, the same K), and the flow with convolutional couplings and
# uniform or variational dequantization. Each with its macro prefix and its label in the tables.
EXT_VAE_RUNS = (("ExtVaeGaussian", "vae_gaussian", "Gaussian"), ("ExtVaePlanar", "vae_planar_k8", "planar"),
                ("ExtVaeIaf", "vae_iaf_k4", "IAF"))
EXT_NF_RUNS = (("ExtNfConv", "nf_conv"), ("ExtNfConvVar", "nf_conv_variational"))
EXTENSIONS = tuple(name for _, name, _ in EXT_VAE_RUNS) + tuple(name for _, name in EXT_NF_RUNS)
# In words, for the report: the binarized MNIST that the VAE extensions trained and were tested on.
BMNIST_SOURCES = {
    "original": "the original binarized MNIST files~\\cite{larochelle2011}, so they compare with the papers'",
    "reproduction": "our reproduction of the standard binarized MNIST~\\cite{larochelle2011}: its protocol "
                    "(one fixed Bernoulli draw of each pixel, 50,000 training, 10,000 validation and the "
                    "10,000 test images), not its bits, so they compare with published numbers only roughly",
}
# A sample counts as memorised when it is nearer to a training image than all but MEMORISED_QUANTILE
# of the test images are to theirs, so a model that does not copy scores about that share; the
# quantile is taken over the TEST_IMAGES images of MNIST's test set.
TEST_IMAGES = 10_000
# How the GAN's progress rows name the images they were scored against, in words for the report.
PROGRESS_REFERENCES = {
    "selection": "a fixed subset of the training images (the selection reference)",
    "test": "the test images",
}
# The canonical models of the comparison table, with their labels.
MODELS = (("VAE", "vae"), ("GAN", "gan"), ("RealNVP", "nf"))
HEADER = "% Generated by report/make_numbers.py from results/: do not edit.\n"


@dataclass(frozen=True)
class Number:
    """One macro: the value at ``path`` (keys and list indices) in the metrics of ``run`` (a canonical
    run, an entry of experiments.py by its name, "extensions/<name>" or "reference"), times ``scale``,
    written with ``fmt``: "int" (digit groups), "f1".."f4" (decimals), "g" (shortest) or "text"."""

    macro: str
    run: str
    path: tuple
    fmt: str
    scale: float = 1.0


def setting(key):
    """The path of a run's setting ``key``: what it trained with, as its Settings resolved it."""
    return ("settings", key)


def training_numbers(prefix, run):
    """What every run reports about its training: size, length, time, speed."""
    return [
        Number(f"{prefix}Params", run, ("n_params",), "int"),
        Number(f"{prefix}Epochs", run, ("epochs_completed",), "int"),
        Number(f"{prefix}TrainMinutes", run, ("wall_time_s",), "f1", 1 / 60),
        Number(f"{prefix}ImagesPerSecond", run, ("images_per_s",), "int"),
    ]


def evaluation_numbers(prefix, run):
    """The evaluation package's sample measures, the same for every model."""
    return [
        Number(f"{prefix}Fid", run, ("evaluation", "fid"), "f2"),
        Number(f"{prefix}Score", run, ("evaluation", "score"), "f2"),
        Number(f"{prefix}ClassKl", run, ("evaluation", "class_kl_uniform"), "f3"),
        Number(f"{prefix}ParzenLl", run, ("evaluation", "parzen_ll"), "f1"),
    ]


def yardstick_numbers(prefix, run):
    """The measures that the canonical runs' evaluations add: precision and recall, and the share of
    samples nearer to a training image than 99% of test images are (percent, pixels and features)."""
    return [
        Number(f"{prefix}Precision", run, ("evaluation", "precision"), "f3"),
        Number(f"{prefix}Recall", run, ("evaluation", "recall"), "f3"),
        Number(f"{prefix}MemorisedPixels", run, ("evaluation", "memorisation", "pixel", "share"), "f2",
               100),
        Number(f"{prefix}MemorisedFeatures", run, ("evaluation", "memorisation", "feature", "share"), "f2",
               100),
    ]


def ext_vae_numbers(prefix, name):
    """A VAE extension run: its test bounds (nats), length and training time."""
    run = f"extensions/{name}"
    return [
        Number(f"{prefix}NegElbo", run, ("test", "negative_elbo"), "f2"),
        Number(f"{prefix}Nll", run, ("test", "nll_importance"), "f2"),
        Number(f"{prefix}Epochs", run, ("epochs_completed",), "int"),
        Number(f"{prefix}TrainMinutes", run, ("wall_time_s",), "f1", 1 / 60),
    ]


def ext_nf_numbers(prefix, name):
    """A flow extension run: its test bits/dim (one-sample bound, importance-weighted over the noise),
    final validation bits/dim, size, length, training time and the FID of its samples."""
    run = f"extensions/{name}"
    return [
        Number(f"{prefix}Bpd", run, ("test", "bpd"), "f3"),
        Number(f"{prefix}IwBpd", run, ("test", "bpd_importance_weighted"), "f3"),
        Number(f"{prefix}ValBpd", run, ("curves", "val_bpd", -1), "f3"),
        Number(f"{prefix}Params", run, ("n_params",), "int"),
        Number(f"{prefix}Epochs", run, ("epochs_completed",), "int"),
        Number(f"{prefix}TrainMinutes", run, ("wall_time_s",), "f1", 1 / 60),
        Number(f"{prefix}Fid", run, ("evaluation", "fid"), "f1"),
    ]


NUMBERS = [
    # ------------------------------------------------------------ VAE
    *training_numbers("Vae", "vae"),
    *evaluation_numbers("Vae", "vae"),
    *yardstick_numbers("Vae", "vae"),
    Number("VaeEvalSamples", "vae", ("evaluation", "n_samples"), "int"),
    Number("VaeZdim", "vae", setting("z_dim"), "int"),
    Number("VaeHiddenDim", "vae", setting("hidden_dim"), "int"),
    Number("VaeBatchSize", "vae", setting("batch_size"), "int"),
    Number("VaeLr", "vae", setting("lr"), "g"),
    Number("VaeWarmupEpochs", "vae", setting("kl_warmup_epochs"), "int"),
    Number("VaeTestNegElbo", "vae", ("test", "negative_elbo"), "f2"),
    Number("VaeTestNll", "vae", ("test", "nll_importance"), "f2"),
    Number("VaeImportanceSamples", "vae", ("test", "importance_samples"), "int"),
    Number("VaeValImportanceSamples", "vae", ("validation", "importance_samples"), "int"),
    Number("VaeValNll", "vae", ("validation", "nll_importance"), "f2"),
    # The sample measures of the binary samples x ~ p(x|z), beside those of their means ("evaluation").
    Number("VaeBinaryFid", "vae", ("evaluation_binary", "fid"), "f2"),
    Number("VaeBinaryPrecision", "vae", ("evaluation_binary", "precision"), "f3"),
    Number("VaeBinaryRecall", "vae", ("evaluation_binary", "recall"), "f3"),
    Number("VaeBinaryScore", "vae", ("evaluation_binary", "score"), "f2"),
    Number("VaeInitValNegElbo", "vae", ("curves", "val_negative_elbo", 0), "f1"),
    Number("VaeTrainNegElbo", "vae", ("curves", "train_negative_elbo", -1), "f2"),
    Number("VaeNaiveImages", "vae", ("naive_mc", "images"), "int"),
    Number("VaeNaiveRepeats", "vae", ("naive_mc", "repeats"), "int"),
    *training_numbers("VaeZtwo", "vae_z2"),
    Number("VaeZtwoZdim", "vae_z2", setting("z_dim"), "int"),
    Number("VaeZtwoTestNegElbo", "vae_z2", ("test", "negative_elbo"), "f2"),
    # ------------------------------------------------------------ GAN
    *training_numbers("Gan", "gan"),
    *evaluation_numbers("Gan", "gan"),
    *yardstick_numbers("Gan", "gan"),
    Number("GanParamsGenerator", "gan", ("n_params_generator",), "int"),
    Number("GanLatentDim", "gan", setting("latent_dim"), "int"),
    Number("GanBatchSize", "gan", setting("batch_size"), "int"),
    Number("GanLr", "gan", setting("lr"), "g"),
    Number("GanLossD", "gan", ("curves", "loss_d", -1), "f3"),
    Number("GanDReal", "gan", ("curves", "d_real", -1), "f3"),
    Number("GanDFake", "gan", ("curves", "d_fake", -1), "f3"),
    Number("GanEma", "gan", setting("ema_decay"), "g"),
    Number("GanRGamma", "gan", setting("r1_gamma"), "g"),
    Number("GanRoneInterval", "gan", setting("r1_interval"), "int"),
    Number("GanInterpFrom", "gan", ("interpolation_digits", 0, "digits", 0), "int"),
    Number("GanInterpTo", "gan", ("interpolation_digits", 0, "digits", 1), "int"),
    # The GAN trained exactly as the template does (the first rung of the selection ladder); its
    # "evaluation" is scored against the test images at the end, not used for choosing.
    *evaluation_numbers("GanTemplate", TEMPLATE_ENTRIES["Gan"]),
    Number("GanTemplateBatchSize", TEMPLATE_ENTRIES["Gan"], setting("batch_size"), "int"),
    Number("GanTemplateLr", TEMPLATE_ENTRIES["Gan"], setting("lr"), "g"),
    Number("GanTemplateLossD", TEMPLATE_ENTRIES["Gan"], ("curves", "loss_d", -1), "f3"),
    # ------------------------------------------------------------ flow
    *training_numbers("Nf", "nf"),
    *evaluation_numbers("Nf", "nf"),
    *yardstick_numbers("Nf", "nf"),
    Number("NfBatchSize", "nf", setting("batch_size"), "int"),
    Number("NfLr", "nf", setting("lr"), "g"),
    Number("NfTemplateLr", "nf_template", setting("lr"), "g"),
    Number("NfWarmup", "nf", setting("warmup_epochs"), "g"),
    Number("NfClip", "nf", setting("clip"), "g"),
    Number("NfTestBpd", "nf", ("test", "bpd"), "f3"),
    Number("NfTrainBpd", "nf", ("curves", "train_bpd", -1), "f3"),
    Number("NfValBpd", "nf", ("curves", "val_bpd", -1), "f3"),
    # The template's batch and learning rate, as its shortened run of the selection recorded them.
    # ------------------------------------------------------------ real images and the classifier
    Number("ClassifierAccuracy", "reference", ("classifier_test_accuracy",), "f2", 100),
    # The real images' row: the mean over random subsets, and (Sd) the standard deviation over them.
    Number("RealImages", "reference", ("rows", 0, "n_samples"), "int"),
    Number("RealSubsets", "reference", ("rows", 0, "n_subsets"), "int"),
    Number("RealFid", "reference", ("rows", 0, "fid"), "f2"),
    Number("RealFidSd", "reference", ("rows", 0, "fid_sd"), "f2"),
    Number("RealPrecision", "reference", ("rows", 0, "precision"), "f3"),
    Number("RealPrecisionSd", "reference", ("rows", 0, "precision_sd"), "f3"),
    Number("RealRecall", "reference", ("rows", 0, "recall"), "f3"),
    Number("RealRecallSd", "reference", ("rows", 0, "recall_sd"), "f3"),
    Number("RealScore", "reference", ("rows", 0, "score"), "f2"),
    Number("RealClassKl", "reference", ("rows", 0, "class_kl_uniform"), "f3"),
    Number("RealParzenLl", "reference", ("rows", 0, "parzen_ll"), "f1"),
    # ------------------------------------------------------------ beyond the assignment
    *[number for prefix, name, _ in EXT_VAE_RUNS for number in ext_vae_numbers(prefix, name)],
    Number("ExtNfConvBatchSize", "extensions/nf_conv", setting("batch_size"), "int"),
    Number("ExtNfConvLr", "extensions/nf_conv", setting("lr"), "g"),
    Number("ExtNfConvWarmup", "extensions/nf_conv", setting("warmup_epochs"), "g"),
    Number("ExtVaePlanarSteps", "extensions/vae_planar_k8", setting("flow_steps"), "int"),
    Number("ExtVaeIafSteps", "extensions/vae_iaf_k4", setting("flow_steps"), "int"),
    *[number for prefix, name in EXT_NF_RUNS for number in ext_nf_numbers(prefix, name)],
]


def lookup(metrics, run, *path):
    """metrics[run][path[0]][path[1]]..., or None when any step is missing."""
    value = metrics.get(run)
    for key in path:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            return None
    return value


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def compare(value, reference, spread):
    """"above", "below" or "within the standard errors of": ``value`` against ``reference``, where
    ``spread`` is the sum of their standard errors (None when either number is missing)."""
    if not (is_number(value) and is_number(reference) and is_number(spread)):
        return None
    if abs(value - reference) <= spread:
        return "within the standard errors of"
    return "above" if value > reference else "below"


def relation(value, reference, fmt):
    """"below", "above" or "equal to": ``value`` against ``reference`` as the report prints them
    (rounded with ``fmt``, "f1".."f4"), so that the words agree with the printed numbers; None when
    either is missing."""
    if not (is_number(value) and is_number(reference)):
        return None
    digits = int(fmt[1:])
    value, reference = round(value, digits), round(reference, digits)
    return "equal to" if value == reference else "below" if value < reference else "above"


def common_value(values):
    """The one value that all given (present) values share, or None if they differ or none is there."""
    present = {value for value in values if value is not None}
    return present.pop() if len(present) == 1 else None


def epochs_in_words(epochs):
    """[1] -> "epoch 1", [1, 2] -> "epochs 1 and 2", [1, 2, 3] -> "epochs 1 to 3", [1, 3, 4] ->
    "epochs 1, 3 and 4"."""
    if len(epochs) == 1:
        return f"epoch {epochs[0]}"
    if len(epochs) > 2 and epochs == list(range(epochs[0], epochs[-1] + 1)):
        return f"epochs {epochs[0]} to {epochs[-1]}"
    return f"epochs {', '.join(map(str, epochs[:-1]))} and {epochs[-1]}"


def off_axis_note(train_curve, val_curve):
    """The sentence of the bits/dim figure's caption that says which first epochs lie above its axis
    (a3_nf_template.bpd_axis), "" when none does; None (a placeholder) when the curves are missing."""
    curves = [curve if isinstance(curve, list) else [] for curve in (train_curve, val_curve)]
    if not all(curves) or not all(map(is_number, curves[0] + curves[1])) or len(curves[0]) != len(curves[1]):
        return None
    top = a3_nf_template.bpd_axis(*curves)[1]
    above = [epoch for epoch, values in enumerate(zip(*curves, strict=True), 1) if max(values) > top]
    if not above:
        return ""
    return (f" The axis stops at {top:.2f} bits per dimension and cuts off the higher values of "
            f"{epochs_in_words(above)}.")


def derived_numbers(metrics):
    """{macro: (value, fmt)} for the numbers that are more than one lookup."""
    def get(run, *path):
        return lookup(metrics, run, *path)

    def figure_tag(run, moment):
        """What report.tex puts after samples_epoch / means_epoch for the run's figures at ``moment``
        (e.g. "020" of samples_epoch020): read from the file names the run recorded, MISSING_TAG
        unless both figures are there under names of that form."""
        samples, means = (get(run, "figures", f"{kind}_{moment}") for kind in ("samples", "means"))
        tag = samples.removeprefix("samples_epoch") if isinstance(samples, str) else None
        return tag if tag and samples != tag and means == f"means_epoch{tag}" else MISSING_TAG

    def progress(run):
        return [p for p in get(run, "progress") or [] if isinstance(p, dict)]

    def best_progress(run, key, pick):
        """The progress entry with the best ``key`` (pick = min or max), or {}."""
        entries = [p for p in progress(run) if is_number(p.get(key))]
        return pick(entries, key=lambda p: p[key]) if entries else {}

    def fractions(run):
        """A run's class shares of its samples, in percent, or None."""
        shares = get(run, "evaluation", "class_fractions")
        ok = isinstance(shares, list) and len(shares) > 0 and all(map(is_number, shares))
        return [share * 100 for share in shares] if ok else None

    def extremes(prefix, run):
        """{prefix}FractionMin/Max and their digits."""
        shares = fractions(run)
        return {
            f"{prefix}FractionMin": (min(shares) if shares else None, "f1"),
            f"{prefix}FractionMinDigit": (shares.index(min(shares)) if shares else None, "int"),
            f"{prefix}FractionMax": (max(shares) if shares else None, "f1"),
            f"{prefix}FractionMaxDigit": (shares.index(max(shares)) if shares else None, "int"),
        }

    def progress_reference():
        """In words, the images the GAN's progress rows were scored against: rows without a
        "reference" predate the selection reference and were scored against the test images."""
        names = {p.get("reference", "test") for p in progress("gan")}
        if len(names) != 1:
            return None
        name = names.pop()
        return PROGRESS_REFERENCES.get(name, latex_escape(name) if isinstance(name, str) else None)

    def interpolation_pairs():
        """"1$\\to$7, 3$\\to$8 and 0$\\to$6": the digit pairs of the interpolation rows, top to bottom."""
        rows = get("gan", "interpolation_digits") or []
        pairs = [row.get("digits") for row in rows if isinstance(row, dict)]
        if not pairs or not all(isinstance(pair, list) and len(pair) == 2 and all(map(is_number, pair))
                                for pair in pairs):
            return None
        texts = [f"{a}$\\to${b}" for a, b in pairs]
        return " and ".join([", ".join(texts[:-1]), texts[-1]]) if len(texts) > 1 else texts[0]

    nll, negative_elbo = get("vae", "test", "nll_importance"), get("vae", "test", "negative_elbo")
    # The validation ELBO of the final model: the new runs report it beside "test"; older ones only
    # as the last point of the curve, which is the same quantity.
    val_elbo = get("vae", "validation", "negative_elbo")
    val_elbo = val_elbo if is_number(val_elbo) else get("vae", "curves", "val_negative_elbo", -1)
    # Where the plotted validation curve ends (one sample of z per image), which the text about the
    # figure quotes; val_elbo above averages K samples per image.
    curve_val_elbo = get("vae", "curves", "val_negative_elbo", -1)
    naive_rows = get("vae", "naive_mc", "rows") or []
    naive_samples = [row.get("samples") for row in naive_rows if isinstance(row, dict)]
    naive_samples = [s for s in naive_samples if is_number(s)]
    best = best_progress("gan", "fid", min)
    parzen_peak = best_progress("gan", "parzen_ll", max)
    real = get("reference", "rows", 0) or {}

    def parzen_against_real(evaluation):
        """A Parzen estimate against the real images' one, in words (see compare)."""
        errors = (evaluation.get("parzen_se"), real.get("parzen_se"))
        return compare(evaluation.get("parzen_ll"), real.get("parzen_ll"),
                       sum(errors) if all(map(is_number, errors)) else None)

    def memorised_against_chance(run):
        """The larger of a run's memorised shares (pixels, features) against MEMORISED_QUANTILE, in
        words (see compare): its binomial standard error on the samples plus that of the quantile."""
        shares = [get(run, "evaluation", "memorisation", space, "share") for space in ("pixel", "feature")]
        samples = get(run, "evaluation", "n_samples")
        if not (all(map(is_number, shares)) and is_number(samples) and samples > 0):
            return None
        q = MEMORISED_QUANTILE
        spread = sum(math.sqrt(q * (1 - q) / n) for n in (samples, TEST_IMAGES))
        return compare(max(shares), q, spread)

    template_best = best_progress(TEMPLATE_ENTRIES["Gan"], "fid", min)
    return {
        **extension_numbers(get),
        "VaeHalfwayEpoch": (get("vae", "milestones", "halfway"), "int"),
        **{macro: (figure_tag("vae", moment), "tag") for macro, moment in VAE_FIGURE_TAGS.items()},
        "VaeValNegElbo": (val_elbo, "f2"),
        "VaeCurveValNegElbo": (curve_val_elbo, "f2"),
        "VaeData": (BMNIST_SOURCES.get(get("vae", "data", "binarized_mnist")), "latex"),
        # Which first epochs lie above the axis of the flow's bits/dim figure.
        "NfOffAxis": (off_axis_note(get("nf", "curves", "train_bpd"), get("nf", "curves", "val_bpd")),
                      "text"),
        "VaeTestNllBpd": (nll / (784 * math.log(2)) if is_number(nll) else None, "f3"),
        "VaeElboGap": (negative_elbo - nll if is_number(nll) and is_number(negative_elbo) else None, "f2"),
        "VaeNaiveMaxSamples": (max(naive_samples) if naive_samples else None, "int"),
        "GanHalfwayEpoch": (get("gan", "milestones", "halfway"), "int"),
        # The first epoch whose learning rate is below the base one.
        "GanLrDecayEpoch": (get("gan", "milestones", "lr_decay_start"), "int"),
        **extremes("Gan", "gan"),
        **extremes("GanTemplate", TEMPLATE_ENTRIES["Gan"]),
        "GanBestFidEpoch": (best.get("epoch"), "int"),
        "GanBestFid": (best.get("fid"), "f2"),
        "GanProgressAgainst": (progress_reference(), "latex"),
        "GanParzenPeakEpoch": (parzen_peak.get("epoch"), "int"),
        "GanParzenPeak": (parzen_peak.get("parzen_ll"), "f1"),
        "GanParzenPeakVsReal": (parzen_against_real(parzen_peak), "text"),
        "GanParzenVsReal": (parzen_against_real(get("gan", "evaluation") or {}), "text"),
        "GanInterpPairs": (interpolation_pairs(), "latex"),
        "GanMemorisedVsChance": (memorised_against_chance("gan"), "text"),
        "GanTemplateBestFidEpoch": (template_best.get("epoch"), "int"),
        "GanTemplateBestFid": (template_best.get("fid"), "f1"),
    }


def extension_numbers(get):
    """The derived numbers of the runs beyond the assignment; ``get(run, *path)`` looks one up."""
    def ext(name, *path):
        return get(f"extensions/{name}", *path)

    def difference(a, b):
        return a - b if is_number(a) and is_number(b) else None

    numbers = {}
    gaussian = "vae_gaussian"
    for prefix, name, _ in EXT_VAE_RUNS:
        # -ELBO - NLL, the estimate of KL(q(z|x) || p(z|x)) of question 1.8.
        gap = difference(ext(name, "test", "negative_elbo"), ext(name, "test", "nll_importance"))
        numbers[f"{prefix}Gap"] = (gap, "f2")
        if name != gaussian:
            gaussian_gap = difference(ext(gaussian, "test", "negative_elbo"),
                                      ext(gaussian, "test", "nll_importance"))
            numbers[f"{prefix}NllVsGaussian"] = (
                relation(ext(name, "test", "nll_importance"), ext(gaussian, "test", "nll_importance"), "f2"),
                "text")
            numbers[f"{prefix}GapVsGaussian"] = (relation(gap, gaussian_gap, "f2"), "text")
    vae_names = [name for _, name, _ in EXT_VAE_RUNS]
    numbers["ExtVaeImportanceSamples"] = (
        common_value(ext(name, "test", "importance_samples") for name in vae_names), "int")
    source = common_value(ext(name, "data", "binarized_mnist") for name in vae_names)
    numbers["ExtVaeData"] = (BMNIST_SOURCES.get(source), "latex")

    conv, variational = "nf_conv", "nf_conv_variational"
    numbers["ExtNfNoiseSamples"] = (
        common_value([get("nf", "test", "noise_samples"),
                      *(ext(name, "test", "noise_samples") for _, name in EXT_NF_RUNS)]), "int")
    conv_params, mlp_params = ext(conv, "n_params"), get("nf", "n_params")
    numbers["ExtNfConvParamShare"] = (
        100 * conv_params / mlp_params if is_number(conv_params) and is_number(mlp_params) and mlp_params
        else None, "f2")
    # The first epoch after which the conv flow's validation bits/dim is below the MLP's final one.
    mlp_final = get("nf", "curves", "val_bpd", -1)
    curve = ext(conv, "curves", "val_bpd") or []
    passed = [epoch for epoch, bpd in enumerate(curve, 1) if is_number(bpd) and is_number(mlp_final)
              and bpd < mlp_final]
    numbers["ExtNfConvPassesMlpEpoch"] = (passed[0] if passed else None, "int")
    for key, macro in (("bpd", "Bpd"), ("bpd_importance_weighted", "IwBpd")):
        numbers[f"ExtNfConvVar{macro}VsConv"] = (
            relation(ext(variational, "test", key), ext(conv, "test", key), "f3"), "text")
    return numbers


def latex_escape(text):
    replacements = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#",
                    "$": r"\$", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}
    return "".join(replacements.get(c, c) for c in str(text))


def format_value(value, fmt):
    """``value`` as LaTeX text; a missing value (None, non-finite) becomes the placeholder. "tag" and
    "latex" pass text through unescaped (file-name parts; LaTeX this script built itself)."""
    if fmt == "tag":
        return value
    if fmt in ("text", "latex"):
        if value is None:
            return PLACEHOLDER
        return latex_escape(value) if fmt == "text" else str(value)
    if not is_number(value):
        return PLACEHOLDER
    if fmt == "int":
        text = f"{round(value):,}".replace(",", "{,}")
    elif fmt == "g":
        text = f"{value:g}"
    elif fmt.startswith("f") and fmt[1:].isdigit():
        text = f"{value:.{int(fmt[1:])}f}"
    else:
        raise ValueError(f"unknown format {fmt!r}")
    # A hyphen in running text is not a minus sign.
    return r"\ensuremath{-}" + text[1:] if text.startswith("-") else text


def read_json(path, read=lambda path: json.loads(path.read_text())):
    """``read(path)``, or None with a warning when the file is missing, not valid JSON or (read by
    harness.schema) not of the current schema."""
    if not path.exists():
        print(f"warning: {path} not found; its numbers become ??", file=sys.stderr)
        return None
    try:
        return read(path)
    except json.JSONDecodeError as error:
        print(f"warning: {path} is not valid JSON ({error}); its numbers become ??", file=sys.stderr)
    except SchemaError as error:
        print(f"warning: {error}; its numbers become ??", file=sys.stderr)
    return None


def load_metrics(results, declarations=experiments):
    """{name: metrics} for the canonical runs (results/<run>/), the entries of ``declarations``
    (experiments.py, or a module like it: EXPERIMENTS), by name, each from its folder (an entry that
    names a canonical run shares its metrics), the extension runs ("extensions/<name>",
    results/extensions/<name>/) and "reference" (results/reference.json), for the files that exist and
    are of the current schema; warns about the others. No other run folder is read. A run's
    "evaluation" is the latest one, the same that results/comparison.md shows."""
    results = Path(results)
    folders = {run: results / run for run in RUNS}
    folders.update({entry.name: tables.entry_folder(results, entry) for entry in declarations.EXPERIMENTS
                    if entry.name not in folders})
    folders.update({f"extensions/{name}": results / "extensions" / name for name in EXTENSIONS})
    metrics, read = {}, {}
    for name, folder in folders.items():
        if folder not in read:
            read[folder] = read_json(folder / "metrics.json", lambda path: tables.read_run(path.parent))
        if read[folder] is not None:
            metrics[name] = read[folder]
    if (reference := read_json(results / "reference.json")) is not None:
        metrics["reference"] = reference
    return metrics


@dataclass(frozen=True)
class Selection:
    """One model's selection experiments: its ``entries`` (of experiments.py, in their order), the
    held-out ``scores`` of the candidates that have one ({name: score}, report.tables' definition), the
    ``chosen`` entry (the lowest score, None until every candidate has one) and whether that is the
    script's default (``is_default``, None without a choice). Where shortened runs shortlist the
    settings that then train in full (report.tables.deciding_groups), the runs in full choose, and
    ``shortlist`` holds the shortened candidates by their score, lowest first."""

    entries: tuple
    scores: dict
    chosen: object
    is_default: object
    shortlist: tuple = ()
    in_full: dict = field(default_factory=dict)  # {shortlisted name: the entry in full}

    def partner(self, entry):
        """The seed-42 entry that a seed study repeats with another seed (the same script, base and
        overrides), or None: an entry that is no seed study."""
        if entry.candidate or entry.seed == 42:
            return None
        return next((other for other in self.entries if other.seed == 42 and other.base == entry.base
                     and other.overrides == entry.overrides), None)


def selections(metrics, declarations=experiments):
    """{script: Selection} for each script of SELECTION_TABLES, from the runs in ``metrics``."""
    chosen = {}
    for script in SELECTION_TABLES:
        entries = tuple(entry for entry in declarations.EXPERIMENTS if entry.script == script)
        runs = {entry.name: metrics.get(entry.name) for entry in entries}
        scores = tables.candidate_scores(script, entries, runs)
        candidates = [entry for entry in entries if entry.candidate]
        deciding = tables.deciding_groups(entries)
        final = {entry.name for entry in candidates if not deciding or entry.group in deciding}
        done = candidates and len(scores) == len(candidates)
        best = tables.lowest({name: scores[name] for name in final & scores.keys()}) if done else None
        entry = next((entry for entry in entries if entry.name == best), None)
        shortlist = tuple(sorted((entry for entry in candidates
                                  if entry.name not in final and entry.name in scores),
                                 key=lambda entry: scores[entry.name]))
        is_default = None if entry is None else tables.is_default(entry, declarations)
        in_full = {short.name: full for short in candidates
                   if (full := tables.trained_in_full(short, entries, declarations)) is not None}
        chosen[script] = Selection(entries, scores, entry, is_default, shortlist, in_full)
    return chosen


def selection_numbers(metrics, chosen):
    """{macro: (value, fmt)} of the selection experiments, from ``chosen`` (see selections): per model
    the chosen entry's note and whether it is the default; the template's and the default's scores
    (VAE, GAN), the spread of the GAN's score over the seeds of the default and of the template, and
    the flow's template's score, its chosen learning rate, batch and score and the epochs of its
    shortened runs."""
    numbers = {}
    for script, (_, prefix) in SELECTION_TABLES.items():
        selection = chosen[script]
        numbers[f"{prefix}SelectionChosen"] = (selection.chosen.note if selection.chosen else None, "text")
        numbers[f"{prefix}SelectionIsDefault"] = (
            None if selection.is_default is None else "the default" if selection.is_default
            else "not the default", "text")

    def score(script, name):
        return tables.SELECTIONS[script][2](metrics[name]) if name in metrics else None

    def seed_spread(name):
        """max - min of the score over the seed-42 entry ``name`` and its seed studies (all run)."""
        selection = chosen[experiments.GAN]
        seeds = [entry.name for entry in selection.entries if entry.name == name
                 or getattr(selection.partner(entry), "name", None) == name]
        values = [score(experiments.GAN, seed) for seed in seeds]
        return max(values) - min(values) if len(values) > 1 and all(map(is_number, values)) else None

    vae, gan = experiments.VAE, experiments.GAN
    numbers["VaeSelectionTemplateNll"] = (score(vae, TEMPLATE_ENTRIES["Vae"]), "f2")
    numbers["VaeSelectionDefaultNll"] = (score(vae, DEFAULT_ENTRIES["Vae"]), "f2")
    # The KL warm-up added to the template's training alone, and left out of all four.
    numbers["VaeSelectionWarmupNll"] = (score(vae, "vae_template_kl_warmup"), "f2")
    numbers["VaeSelectionNoWarmupNll"] = (score(vae, "vae_without_kl_warmup"), "f2")
    numbers["GanSelectionTemplateFid"] = (score(gan, TEMPLATE_ENTRIES["Gan"]), "f2")
    numbers["GanSelectionDefaultFid"] = (score(gan, DEFAULT_ENTRIES["Gan"]), "f2")
    numbers["GanSelectionSeedSpread"] = (seed_spread(DEFAULT_ENTRIES["Gan"]), "f2")
    numbers["GanSelectionTemplateSeedSpread"] = (seed_spread(TEMPLATE_ENTRIES["Gan"]), "f2")
    numbers["NfSelectionTemplateValBpd"] = (score(experiments.NF, TEMPLATE_ENTRIES["Nf"]), "f3")
    # The flow's shortened runs: the best two, and the best's run in full (its learning rate and its
    # training curve's highest point after the first epoch, where a diverging run jumps).
    flow = chosen[experiments.NF]
    best, second = ([entry.name for entry in flow.shortlist] + [None, None])[:2]
    numbers["NfSelectionBestLr"] = (lookup(metrics, best, "settings", "lr"), "g")
    numbers["NfSelectionBestBatchSize"] = (lookup(metrics, best, "settings", "batch_size"), "int")
    numbers["NfSelectionBestValBpd"] = (flow.scores.get(best), "f3")
    numbers["NfSelectionSecondLr"] = (lookup(metrics, second, "settings", "lr"), "g")
    numbers["NfSelectionSecondValBpd"] = (flow.scores.get(second), "f3")
    numbers["NfSelectionEpochs"] = (common_value(lookup(metrics, entry.name, "settings", "epochs")
                                                 for entry in flow.shortlist), "int")
    full = getattr(flow.in_full.get(best), "name", None)
    numbers["NfSelectionBestInFullValBpd"] = (flow.scores.get(full), "f3")
    curve = lookup(metrics, full, "curves", "train_bpd") or []
    peak = max(range(1, len(curve)), key=curve.__getitem__, default=None)
    numbers["NfSelectionBestInFullPeakEpoch"] = (None if peak is None else peak + 1, "int")
    numbers["NfSelectionBestInFullPeakBpd"] = (None if peak is None else curve[peak], "int")
    return numbers


def macro_values(metrics, chosen):
    """{macro name: LaTeX text} for every macro; ``chosen`` is what ``selections`` returns."""
    values = {}
    for number in NUMBERS:
        value = lookup(metrics, number.run, *number.path)
        values[number.macro] = format_value(value * number.scale if is_number(value) else value, number.fmt)
    for macro, (value, fmt) in {**derived_numbers(metrics), **selection_numbers(metrics, chosen)}.items():
        values[macro] = format_value(value, fmt)
    return values


def numbers_tex(values):
    return HEADER + "".join(f"\\newcommand{{\\{name}}}{{{text}}}\n" for name, text in sorted(values.items()))


def table(rows):
    return HEADER + "".join(" & ".join(cells) + " \\\\\n" for cells in rows)


def sample_cells(evaluation):
    """FID, score, class KL and Parzen log-likelihood of one evaluation dict (or placeholders)."""
    evaluation = evaluation or {}
    return [format_value(evaluation.get("fid"), "f2"), format_value(evaluation.get("score"), "f2"),
            format_value(evaluation.get("class_kl_uniform"), "f3"),
            format_value(evaluation.get("parzen_ll"), "f1")]


def comparison_rows(metrics):
    """One row per canonical model: its size, its epochs and its own likelihood (training times, which
    depend on the machine, are the README's)."""
    own_likelihood = {"vae": (("test", "nll_importance"), "f1", r"\,nats"),
                      "nf": (("test", "bpd"), "f3", r"\,bpd")}
    rows = []
    for label, run in MODELS:
        if run in own_likelihood:
            path, fmt, unit = own_likelihood[run]
            likelihood = format_value(lookup(metrics, run, *path), fmt)
            likelihood += unit if likelihood != PLACEHOLDER else ""
        else:
            likelihood = "none"
        rows.append([
            label,
            format_value(lookup(metrics, run, "n_params"), "int"),
            format_value(lookup(metrics, run, "epochs_completed"), "int"),
            likelihood,
        ])
    return table(rows)


def yardstick_cells(evaluation, suffix="", memorised=True):
    """FID, precision, recall, score, class KL, the memorised shares (percent, pixels / features) and
    the Parzen log-likelihood of one evaluation dict; with ``suffix`` "_sd", their standard
    deviations over the real-data subsets. ``memorised`` False: a dash in that column (real images
    have no memorisation share: training images are their own nearest neighbours)."""
    evaluation = evaluation or {}

    def cell(key, fmt):
        return format_value(evaluation.get(key + suffix), fmt)

    shares = [lookup(evaluation, "memorisation", space, "share") for space in ("pixel", "feature")]
    shares = " / ".join(format_value(share * 100 if is_number(share) else None, "f2") for share in shares)
    return [cell("fid", "f2"), cell("precision", "f3"), cell("recall", "f3"), cell("score", "f2"),
            cell("class_kl_uniform", "f3"), shares if memorised else "--", cell("parzen_ll", "f1")]


def comparison_sample_rows(metrics):
    """The sample measures of each canonical model (the VAE's of its decoder means and, in a row below,
    of the binary images drawn from them), then the real images of results/reference.json: the mean
    over its random subsets and, in a row below, their standard deviation."""
    rows = []
    for label, run in MODELS:
        rows.append([label, *yardstick_cells(lookup(metrics, run, "evaluation"))])
        if run == "vae":
            rows[-1][0] = "VAE, means"
            rows.append([r"\quad binary samples", *yardstick_cells(lookup(metrics, run, "evaluation_binary"),
                                                                   memorised=False)])
    real = lookup(metrics, "reference", "rows", 0)
    subsets = format_value(lookup(metrics, "reference", "rows", 0, "n_subsets"), "int")
    rows.append([rf"\midrule real images, mean of {subsets}", *yardstick_cells(real, memorised=False)])
    rows.append([r"\quad standard deviation", *yardstick_cells(real, "_sd", memorised=False)])
    return table(rows)


def ext_vae_rows(metrics):
    """Beyond the assignment, the VAE: per run, posterior, flow steps K, IW samples k, epochs,
    training minutes, test negative ELBO, NLL and their gap (nats)."""
    rows = []
    for _, name, label in EXT_VAE_RUNS:
        run = f"extensions/{name}"

        def get(*path, run=run):
            return lookup(metrics, run, *path)

        posterior = get("settings", "posterior")
        steps = "--" if posterior == "gaussian" else format_value(get("settings", "flow_steps"), "int")
        negative_elbo, nll = get("test", "negative_elbo"), get("test", "nll_importance")
        gap = negative_elbo - nll if is_number(negative_elbo) and is_number(nll) else None
        minutes = get("wall_time_s")
        rows.append([label, steps, format_value(get("settings", "iw_samples"), "int"),
                     format_value(get("epochs_completed"), "int"),
                     format_value(minutes / 60 if is_number(minutes) else None, "f1"),
                     format_value(negative_elbo, "f2"), format_value(nll, "f2"), format_value(gap, "f2")])
    return table(rows)


def ext_nf_rows(metrics):
    """Beyond the assignment, the flow: the canonical MLP run, then the conv runs: coupling network,
    dequantization, parameters, epochs, training minutes, test bits/dim (one-sample bound and
    importance-weighted over the noise)."""
    rows = []
    for run, coupling, dequantization in (("nf", "MLP", "uniform"),
                                          *((f"extensions/{name}", "conv", None) for _, name in EXT_NF_RUNS)):
        def get(*path, run=run):
            return lookup(metrics, run, *path)

        minutes = get("wall_time_s")
        dequantization = dequantization or format_value(get("settings", "dequantization"), "text")
        rows.append([coupling, dequantization, format_value(get("n_params"), "int"),
                     format_value(get("epochs_completed"), "int"),
                     format_value(minutes / 60 if is_number(minutes) else None, "f1"),
                     format_value(get("test", "bpd"), "f3"),
                     format_value(get("test", "bpd_importance_weighted"), "f3")])
    return table(rows)


def gan_progress_rows(metrics):
    """The GAN's sample measures at each epoch its generator was kept (metrics.json "progress")."""
    progress = lookup(metrics, "gan", "progress") or [{}]
    return table([[format_value(p.get("epoch"), "int"), *sample_cells(p)] for p in progress])


def naive_mc_rows(metrics):
    """Question 1.4: per number of samples S, the naive and the importance-sampled estimate of log p(x),
    each as mean over the images of (average over repeats) +- (standard deviation over repeats)."""
    def mean(values):
        return sum(values) / len(values) if values and all(map(is_number, values)) else None

    def cell(row, kind):
        average, spread = mean(row.get(f"{kind}_mean")), mean(row.get(f"{kind}_std"))
        return rf"${format_value(average, 'f1')} \pm {format_value(spread, 'f1')}$"

    rows = lookup(metrics, "vae", "naive_mc", "rows") or [{}]
    return table([[format_value(row.get("samples"), "int"), cell(row, "naive"), cell(row, "importance")]
                  for row in rows])


def _vae_selection_cells(metrics):
    validation = metrics.get("validation") or {}
    return [format_value(validation.get("negative_elbo"), "f2"),
            format_value(tables.SELECTIONS[experiments.VAE][2](metrics), "f2")]


def _gan_selection_cells(metrics):
    row = tables.selection_fid(metrics) or {}
    return [format_value(row.get("fid"), "f2"), format_value(row.get("precision"), "f3"),
            format_value(row.get("recall"), "f3")]


def _nf_selection_cells(metrics):
    return [format_value(tables.SELECTIONS[experiments.NF][2](metrics), "f3")]


# Per script, the cells of a selection table's row after the note: VAE, validation negative ELBO and
# NLL; GAN, FID, precision and recall against the selection reference at the last epoch; flow,
# validation bits/dim.
SELECTION_CELLS = {experiments.VAE: (_vae_selection_cells, 2), experiments.GAN: (_gan_selection_cells, 3),
                   experiments.NF: (_nf_selection_cells, 1)}


def selection_rows(metrics, selection):
    """One row per entry of a model's ``selection`` (see selections): what it adds (its note), its
    held-out measures (SELECTION_CELLS) and a last cell that marks the chosen entry, a seed study or
    another entry that does not compete; an entry not run yet has ?? in every cell after its note."""
    rows = []
    for entry in selection.entries:
        cells, width = SELECTION_CELLS[entry.script]
        run = metrics.get(entry.name)
        if selection.partner(entry) is not None:
            mark = SEED_STUDY
        elif not entry.candidate:
            mark = NO_CANDIDATE
        else:
            mark = CHOSEN if entry is selection.chosen else PLACEHOLDER if run is None else \
                TRAINED_IN_FULL if entry.name in selection.in_full else ""
        measures = cells(run) if run is not None else [PLACEHOLDER] * width
        rows.append([latex_escape(entry.note), *measures, mark])
    return table(rows)


# The generated table files, each a function of the loaded metrics (the selection tables, of
# SELECTION_TABLES, are written beside them).
TABLES = {"comparison_table.tex": comparison_rows, "comparison_samples.tex": comparison_sample_rows,
          "gan_progress.tex": gan_progress_rows, "vae_naive_mc.tex": naive_mc_rows,
          "ext_vae_table.tex": ext_vae_rows, "ext_nf_table.tex": ext_nf_rows}


def write_all(results, out, declarations=experiments):
    """Write every generated file into ``out`` from the runs in ``results`` and the selection
    experiments of ``declarations`` (experiments.py, or a module like it: EXPERIMENTS and
    expected_settings); returns the macro values."""
    metrics = load_metrics(results, declarations)
    chosen = selections(metrics, declarations)
    values = macro_values(metrics, chosen)
    missing = sorted(name for name, text in values.items() if PLACEHOLDER in text or MISSING_TAG in text)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_if_changed(out / "numbers.tex", numbers_tex(values))
    for name, rows in TABLES.items():
        write_text_if_changed(out / name, rows(metrics))
    for script, (name, _) in SELECTION_TABLES.items():
        write_text_if_changed(out / name, selection_rows(metrics, chosen[script]))
    if missing:
        # With no results at all the list would only repeat the warnings above.
        names = f": {', '.join(missing)}" if len(missing) < len(values) else ""
        print(f"warning: {len(missing)} of {len(values)} numbers print as ??{names}", file=sys.stderr)
    print(f"wrote {len(values)} macros and {len(TABLES) + len(SELECTION_TABLES)} tables into {out}")
    return values


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=REPO / "results", help="folder of the runs")
    parser.add_argument("--out", type=Path, default=REPO / "report" / "generated",
                        help="folder for the generated .tex files")
    args = parser.parse_args(argv)
    return write_all(args.results, args.out)


if __name__ == "__main__":
    main()
