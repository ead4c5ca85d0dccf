"""The report's plumbing, without LaTeX: generated numbers, figure paths, macros, the hand-in zip."""

import json
import math
import os
import re
import zipfile
from pathlib import Path

import pytest

from report import make_numbers, make_submission

REPO = Path(__file__).resolve().parents[1]
REPORT_TEX = REPO / "report" / "report.tex"
RESULTS = REPO / "results"


def tex_source():
    """report.tex without comments (a % not escaped as \\% starts one)."""
    return re.sub(r"(?<!\\)%.*", "", REPORT_TEX.read_text())


def parse_numbers(path):
    """{macro: text} of a generated numbers.tex."""
    return dict(re.findall(r"^\\newcommand\{\\([A-Za-z]+)\}\{(.*)\}$", Path(path).read_text(), re.M))


def generated_prefixes(names):
    """The leading capitalised words of the generated macros (Vae, Gan, ...), which mark a macro in
    report.tex as one that numbers.tex must define."""
    return {re.match(r"[A-Z][a-z]+", name).group() for name in names}


# ---------------------------------------------------------------- fake results with known answers

VAE_EPOCHS = 40


def fake_evaluation(fid):
    return {"fid": fid, "score": 9.5, "class_fractions": [0.1] * 10, "class_kl_uniform": 0.0123,
            "parzen_ll": -123.45, "parzen_se": 1.5, "parzen_sigma": 0.2, "n_samples": 10000}


def fake_results(root):
    """results/ with every run's metrics.json and reference.json, as the scripts write them."""
    common = {"device": "cuda", "wall_time_s": 600.0, "images_per_s": 5000.4}
    runs = {
        "vae": {**common, "args": {"epochs": VAE_EPOCHS, "zdim": 20, "hidden_dim": 500, "batch_size": 128,
                                   "lr": 0.001, "warmup_epochs": 5, "seed": 42},
                "n_params": 1234567, "epochs_completed": VAE_EPOCHS, "training_precision": "fp32",
                "curves": {"train_negative_elbo": [543.21, 100.0, 95.555],
                           "val_negative_elbo": [541.09, 101.0, 96.004], "wall_time_s": [0.0, 1.0, 2.0]},
                "test": {"negative_elbo": 96.1234, "nll_importance": 90.0, "importance_samples": 500},
                "naive_mc": {"images": 2, "repeats": 10, "unit": "log-likelihood, nats", "rows": [
                    {"samples": 10, "naive_mean": [-300.0, -200.0], "naive_std": [30.0, 10.0],
                     "importance_mean": [-95.0, -85.0], "importance_std": [0.5, 0.25]},
                    {"samples": 10000, "naive_mean": [-150.0, -130.0], "naive_std": [5.0, 3.0],
                     "importance_mean": [-94.0, -84.0], "importance_std": [0.1, 0.1]}]},
                "evaluation": fake_evaluation(30.0)},
        "vae_z2": {**common, "args": {"epochs": 30, "zdim": 2}, "n_params": 1000, "epochs_completed": 30,
                   "curves": {"val_negative_elbo": [540.0, 140.0]},
                   "test": {"negative_elbo": 140.5, "nll_importance": 138.0, "importance_samples": 500}},
        "gan": {**common, "args": {"n_epochs": 200, "batch_size": 64, "lr": 0.0002, "latent_dim": 100,
                                   "lr_decay_start": 0.25, "ema": 0.999, "real_label": 1.0, "r1_gamma": 1.0,
                                   "r1_interval": 8, "seed": 42},
                "n_params": 2000000, "n_params_generator": 1500000, "epochs_completed": 200,
                "training_precision": "bf16",
                "curves": {"loss_d": [1.2, 1.3], "loss_g": [0.9, 0.8], "d_real": [0.6, 0.55],
                           "d_fake": [0.4, 0.45], "wall_time_s": [1.0, 2.0]},
                "interpolation_digits": [{"digits": [3, 8], "classifier_confidence": [1.0, 0.99]},
                                         {"digits": [1, 7], "classifier_confidence": [0.98, 1.0]}],
                "progress": [{"epoch": 1, **fake_evaluation(80.0)}, {"epoch": 200, **fake_evaluation(5.0)}],
                "evaluation": {"epoch": 200, **fake_evaluation(5.0),
                               "class_fractions": [0.1, 0.1, 0.1, 0.1, 0.12, 0.1, 0.1, 0.08, 0.1, 0.1]}},
        "gan_no_r1": {**common, "args": {"n_epochs": 200, "lr_decay_start": 0.5}, "n_params": 2000000,
                      "epochs_completed": 200,
                      "curves": {"loss_d": [1.1, 0.9]},
                      "progress": [{"epoch": 50, **fake_evaluation(40.0)},
                                   {"epoch": 200, **fake_evaluation(90.0)}],
                      "evaluation": {"epoch": 200, **fake_evaluation(90.0), "class_fractions": [
                          0.1, 0.2, 0.03, 0.09, 0.08, 0.1, 0.1, 0.1, 0.1, 0.1]}},
        "gan_template": {**common, "args": {"n_epochs": 200}, "n_params": 2000000, "epochs_completed": 200,
                         "progress": [{"epoch": 100, **fake_evaluation(60.0)},
                                      {"epoch": 200, **fake_evaluation(70.0)}],
                         "evaluation": {"epoch": 200, **fake_evaluation(70.0)}},
        "nf": {**common, "args": {"epochs": 40, "batch_size": 128, "lr": 0.001, "warmup": 1.0, "clip": 100.0,
                        "weight_decay": 0.0},
               "n_params": 3000000, "epochs_completed": 40, "training_precision": "bf16",
               "curves": {"train_bpd": [8.0, 1.2], "val_bpd": [8.0, 1.25], "wall_time_s": [0.0, 1.0]},
               "test": {"bpd": 1.2468}, "evaluation": fake_evaluation(50.0)},
    }
    for run, metrics in runs.items():
        (root / run).mkdir(parents=True)
        (root / run / "metrics.json").write_text(json.dumps(metrics))
    (root / "nf" / "lr_sweep").mkdir()
    (root / "nf" / "lr_sweep" / "run_a.json").write_text(
        json.dumps({"args": {"lr": 0.002, "weight_decay": 0.0001}, "curves": {"val_bpd": [8.0, 1.5]}}))
    (root / "gan" / "fp32").mkdir()
    (root / "gan" / "fp32" / "metrics.json").write_text(json.dumps(
        {"evaluation": {"fid": 8.123, "score": 9.1}, "wall_time_s": 2400.0}))
    for folder, seed, batch_size, fid, seconds in (("seed_2", 2, 128, 9.921, 1600.0),
                                                   ("seed_1", 1, 128, 9.071, 1500.0),
                                                   ("batch_64", 42, 64, 7.689, 2250.0),
                                                   ("batch_64_seed_1", 1, 64, 9.979, 2260.0)):
        (root / "gan" / folder).mkdir()
        (root / "gan" / folder / "metrics.json").write_text(json.dumps(
            {"args": {"seed": seed, "batch_size": batch_size, "lr": 0.0002, "n_epochs": 200,
                      "lr_decay_start": 0.25},
             "evaluation": {"fid": fid}, "wall_time_s": seconds}))
    (root / "nf" / "batch_128").mkdir()
    (root / "nf" / "batch_128" / "metrics.json").write_text(json.dumps(
        {"args": {"batch_size": 128}, "curves": {"val_bpd": [8.0, 1.2512]}, "test": {"bpd": 1.2401},
         "wall_time_s": 1800.0}))
    reference = {"fingerprint": "x", "classifier_test_accuracy": 0.99,
                 "rows": [{"name": "real_train", **fake_evaluation(0.5)}]}
    (root / "reference.json").write_text(json.dumps(reference))
    return root


@pytest.fixture
def generated(tmp_path):
    """The generated folder written from complete fake results."""
    results = fake_results(tmp_path / "results")
    make_numbers.write_all(results, tmp_path / "generated")
    return tmp_path / "generated"


# ---------------------------------------------------------------- make_numbers

def test_numbers_from_fake_results(generated):
    numbers = parse_numbers(generated / "numbers.tex")
    assert not [name for name, text in numbers.items() if make_numbers.PLACEHOLDER in text], \
        "every macro must have a value when every metrics.json is complete"
    assert numbers["VaeTestNegElbo"] == "96.12"
    assert numbers["VaeTestNll"] == "90.00"
    assert numbers["VaeParams"] == "1{,}234{,}567"
    assert numbers["VaeTrainMinutes"] == "10.0"
    assert numbers["VaeImagesPerSecond"] == "5{,}000"
    assert numbers["VaeInitValNegElbo"] == "541.1"
    assert numbers["VaeValNegElbo"] == "96.00"
    assert numbers["VaeLr"] == "0.001"
    assert numbers["VaeHalfwayEpoch"] == "20"
    assert numbers["VaeHalfwayTag"] == "020"
    assert numbers["VaeFinalTag"] == "040"
    assert numbers["VaeElboGap"] == "6.12"
    assert numbers["VaeTestNllBpd"] == f"{90.0 / (784 * math.log(2)):.3f}"
    assert numbers["VaeZtwoZdim"] == "2"
    assert numbers["GanHalfwayEpoch"] == "100"
    assert (numbers["GanLrDecayEpoch"], numbers["GanNoRoneLrDecayEpoch"]) == ("50", "100")
    assert numbers["GanRoneInterval"] == "8" and numbers["VaePrecision"] == "fp32"
    assert numbers["GanPrecision"] == "bf16"
    assert (numbers["GanFullPrecisionFid"], numbers["GanFullPrecisionScore"],
            numbers["GanFullPrecisionTrainMinutes"]) == ("8.12", "9.10", "40.0")
    assert numbers["GanLr"] == "0.0002"
    # The seed-42 run first, then the other seeds' folders in name order.
    assert numbers["GanSeedFids"] == "5.00 (seed 42), 9.07 (seed 1) and 9.92 (seed 2)"
    assert numbers["GanSeedTrainMinutes"] == "10.0--26.7"
    assert numbers["GanSmallBatchSeedFids"] == "7.69 (seed 42) and 9.98 (seed 1)"
    assert numbers["GanSmallBatchSeedTrainMinutes"] == "37.5--37.7"
    assert (numbers["GanSmallBatchSize"], numbers["GanSmallBatchLr"],
            numbers["GanSmallBatchLrDecayEpoch"]) == ("64", "0.0002", "50")
    assert (numbers["GanBestFidEpoch"], numbers["GanBestFid"]) == ("200", "5.00")
    assert numbers["GanLossD"] == "1.300"
    assert (numbers["GanInterpFrom"], numbers["GanInterpTo"]) == ("3", "8")
    assert numbers["GanFid"] == "5.00"
    assert (numbers["GanFractionMin"], numbers["GanFractionMinDigit"]) == ("8.0", "7")
    assert (numbers["GanFractionMax"], numbers["GanFractionMaxDigit"]) == ("12.0", "4")
    assert (numbers["GanNoRoneBestFidEpoch"], numbers["GanNoRoneBestFid"]) == ("50", "40.0")
    assert numbers["GanNoRoneFractionTwo"] == "3.0" and numbers["GanRGamma"] == "1"
    assert numbers["NfTestBpd"] == "1.247"
    assert (numbers["NfSmallBatchSize"], numbers["NfSmallBatchValBpd"], numbers["NfSmallBatchTestBpd"],
            numbers["NfSmallBatchTrainMinutes"]) == ("128", "1.251", "1.240", "30.0")
    assert (numbers["NfClip"], numbers["NfWarmup"], numbers["NfWeightDecay"]) == ("100", "1", "0")
    assert numbers["NfParzenLl"] == r"\ensuremath{-}123.5"
    assert numbers["TotalTrainHours"] == f"{4 * 600 / 3600:.1f}"
    assert numbers["ClassifierAccuracy"] == "99.00" and numbers["RealFid"] == "0.50"


def test_newer_evaluation_json_wins(tmp_path):
    """As in results/comparison.md: a re-evaluation beside the checkpoint replaces the one in metrics.json."""
    results = fake_results(tmp_path / "results")
    (results / "gan" / "evaluation.json").write_text(json.dumps(fake_evaluation(4.25)))
    metrics = results / "gan" / "metrics.json"
    os.utime(metrics, (metrics.stat().st_atime, metrics.stat().st_mtime - 60))
    numbers = make_numbers.write_all(results, tmp_path / "generated")
    assert numbers["GanFid"] == "4.25"
    assert "\nGAN & 2{,}000{,}000 & 200 & 10.0 & 5{,}000 & n/a & 4.25 &" in \
        (tmp_path / "generated" / "comparison_table.tex").read_text()


def test_tables_from_fake_results(generated):
    rows = [line for line in (generated / "comparison_table.tex").read_text().splitlines()
            if not line.startswith("%")]
    assert [row.split(" & ")[0] for row in rows] == ["VAE", "GAN", "GAN, no R1", "GAN, template", "RealNVP",
                                                      r"\midrule real images"]
    vae, gan, _, _, nf, real = (row.split(" & ") for row in rows)
    assert vae[5] == r"90.0\,nats" and gan[5] == "n/a" and nf[5] == r"1.247\,bpd"
    assert gan[1:5] == ["2{,}000{,}000", "200", "10.0", "5{,}000"]
    assert real[6] == "0.50" and all(len(row) == 10 for row in (vae, gan, nf, real))

    progress = (generated / "gan_progress.tex").read_text().splitlines()[1:]
    assert [row.split(" & ")[:2] for row in progress] == [["1", "80.00"], ["200", "5.00"]]

    naive = (generated / "vae_naive_mc.tex").read_text().splitlines()[1:]
    # Means over the two images: naive (-300 - 200) / 2 with spread (30 + 10) / 2, and so on.
    assert naive[0] == r"10 & $\ensuremath{-}250.0 \pm 20.0$ & $\ensuremath{-}90.0 \pm 0.4$ \\"
    assert naive[1].startswith(r"10{,}000 & $\ensuremath{-}140.0 \pm 4.0$")


def test_missing_results_give_placeholders_and_warnings(tmp_path, capsys):
    values = make_numbers.write_all(tmp_path / "no_results", tmp_path / "generated")
    numbers = parse_numbers(tmp_path / "generated" / "numbers.tex")
    assert numbers == values
    tags = {"VaeHalfwayTag", "VaeFinalTag"}
    assert all(text == make_numbers.PLACEHOLDER for name, text in numbers.items() if name not in tags)
    assert all(numbers[tag] == make_numbers.MISSING_TAG for tag in tags)
    assert "warning" in capsys.readouterr().err
    for table in ("comparison_table.tex", "gan_progress.tex", "vae_naive_mc.tex"):
        assert make_numbers.PLACEHOLDER in (tmp_path / "generated" / table).read_text()


def test_same_macros_with_and_without_results(tmp_path, generated):
    """The report must build before, during and after the runs: the macro set never changes."""
    empty = make_numbers.write_all(tmp_path / "no_results", tmp_path / "empty")
    assert set(empty) == set(parse_numbers(generated / "numbers.tex"))


def test_one_missing_key_and_broken_json(tmp_path, capsys):
    results = fake_results(tmp_path / "results")
    vae = json.loads((results / "vae" / "metrics.json").read_text())
    del vae["test"]["nll_importance"]
    (results / "vae" / "metrics.json").write_text(json.dumps(vae))
    (results / "nf" / "metrics.json").write_text("{ not json")
    numbers = make_numbers.write_all(results, tmp_path / "generated")
    assert numbers["VaeTestNll"] == numbers["VaeElboGap"] == make_numbers.PLACEHOLDER
    assert numbers["VaeTestNegElbo"] == "96.12"
    assert numbers["NfTestBpd"] == make_numbers.PLACEHOLDER
    err = capsys.readouterr().err
    assert "not valid JSON" in err and "VaeTestNll" in err


@pytest.mark.parametrize("value, fmt, text", [
    (1234567.0, "int", "1{,}234{,}567"), (-0.5, "f2", r"\ensuremath{-}0.50"), (0.0002, "g", "0.0002"),
    (float("nan"), "f2", make_numbers.PLACEHOLDER), (None, "int", make_numbers.PLACEHOLDER),
    (True, "int", make_numbers.PLACEHOLDER), ("cuda_0 50%", "text", r"cuda\_0 50\%"),
])
def test_format_value(value, fmt, text):
    assert make_numbers.format_value(value, fmt) == text


# ---------------------------------------------------------------- report.tex against the generated files

def test_every_macro_used_is_generated(tmp_path):
    values = make_numbers.write_all(tmp_path / "no_results", tmp_path / "generated")
    prefixes = generated_prefixes(values)
    source = tex_source()
    pattern = r"\\(" + "|".join(prefixes) + r")(?![a-z])([A-Za-z]*)"
    used = set(re.findall(pattern, source))
    used = {head + tail for head, tail in used}
    own = set(re.findall(r"\\newcommand\{\\([A-Za-z]+)\}", source))
    assert used, "report.tex uses no generated number: the pattern is wrong"
    assert not used - set(values), "report.tex uses macros that make_numbers.py does not define"
    assert not own & set(values), "report.tex redefines a generated macro"


def test_every_generated_table_input_exists(tmp_path):
    make_numbers.write_all(tmp_path / "no_results", tmp_path / "generated")
    inputs = re.findall(r"\\(?:input|inputrows)\{generated/([^}]+)\}", tex_source())
    assert "numbers.tex" in inputs and "comparison_table.tex" in inputs
    assert [name for name in inputs if not (tmp_path / "generated" / name).exists()] == []


FIGURE = re.compile(r"\\(?:resultgraphic|includegraphics)\s*(?:\[[^\]]*\])?\{([^}]*/[^}]*)\}")


def figure_paths(numbers):
    """The results/ paths (run/file) of every figure in report.tex, with generated macros expanded.
    (A path without a folder is the \\resultgraphic definition's own \\includegraphics{\\resultpath}.)"""
    return [re.sub(r"\\([A-Za-z]+)", lambda m: numbers[m.group(1)], path)
            for path in FIGURE.findall(tex_source())]


def missing_figures(results, numbers):
    """(figures of finished runs that are not in ``results``, the runs not finished yet). A run is
    finished once it has written its metrics.json, which the scripts write after their figures."""
    missing, unfinished = [], set()
    for path in figure_paths(numbers):
        run = path.split("/")[0]
        if not (results / run / "metrics.json").exists():
            unfinished.add(run)
        elif not (results / path).is_file():
            missing.append(path)
    return missing, unfinished


def test_figure_paths_expand_from_fake_results(generated):
    paths = figure_paths(parse_numbers(generated / "numbers.tex"))
    assert len(paths) >= 15
    assert "vae/samples_epoch020.pdf" in paths and "vae/means_epoch040.pdf" in paths
    assert all(re.fullmatch(r"[a-z_0-9]+/[A-Za-z_0-9]+\.pdf", path) for path in paths), paths


def test_missing_figures_finds_them(generated):
    """The check below on fake results: all figures present but one, and one run unfinished."""
    results = generated.parent / "results"
    numbers = parse_numbers(generated / "numbers.tex")
    paths = figure_paths(numbers)
    for path in paths:
        (results / path).touch()
    (results / "vae" / "negative_elbo.pdf").unlink()
    (results / "nf" / "metrics.json").unlink()
    missing, unfinished = missing_figures(results, numbers)
    assert missing == ["vae/negative_elbo.pdf"] and unfinished == {"nf"}


def test_every_figure_of_a_finished_run_exists(tmp_path):
    """Each figure that report.tex includes is in results/, for every run that has finished."""
    numbers = make_numbers.write_all(RESULTS, tmp_path / "generated")
    missing, unfinished = missing_figures(RESULTS, numbers)
    assert missing == [], f"report.tex includes figures that the finished runs did not write: {missing}"
    if unfinished >= {path.split("/")[0] for path in figure_paths(numbers)}:
        pytest.skip(f"no finished run to check the figures against (waiting for {sorted(unfinished)})")


# ---------------------------------------------------------------- the hand-in zip

def test_submission_zip(tmp_path):
    files = {
        "a3_vae_template.py": "", "common.py": "", "Makefile": "", "requirements.txt": "",
        "datasets/mnist.py": "", "report/make_numbers.py": "", "report/report.mk": "",
        "report/report.pdf": "%PDF", "report/report.tex": "", "report/generated/numbers.tex": "",
        "results/vae/checkpoint.pt": "", "results/vae/metrics.json": "", "results/helper.py": "",
        "model.pt": "", "data/MNIST/raw/train-images-idx3-ubyte": "", "data/loader.py": "",
        ".venv/lib/site.py": "", "env/pyvenv.cfg": "", "env/lib/site.py": "",
        "datasets/__pycache__/mnist.cpython-312.pyc": "", ".git/hooks/pre-commit.py": "",
        ".pytest_cache/x.py": "", "old_assignment3.zip": "",
    }
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)

    target = make_submission.build("lastname", tmp_path)
    assert target == tmp_path / "lastname_assignment3.zip"
    with zipfile.ZipFile(target) as archive:
        names = sorted(archive.namelist())
        assert archive.read("report.pdf") == b"%PDF"
    assert names == sorted(["report.pdf", "a3_vae_template.py", "common.py", "Makefile", "requirements.txt",
                            "datasets/mnist.py", "report/make_numbers.py", "report/report.mk"])


@pytest.mark.parametrize("name", ["", "../evil", "last name", "9lives", "a/b"])
def test_submission_rejects_bad_names(tmp_path, name):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.pdf").write_text("%PDF")
    with pytest.raises(ValueError):
        make_submission.build(name, tmp_path)
    assert list(tmp_path.glob("*.zip")) == []


def test_submission_needs_the_pdf(tmp_path):
    with pytest.raises(FileNotFoundError, match="make report"):
        make_submission.build("lastname", tmp_path)
