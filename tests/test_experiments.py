"""experiments.py: every declared entry names real settings of its script, changes only what it
names, and runs as the script's own command (an extension module's with ``python -m``)."""

import dataclasses
import importlib
import shutil
import subprocess
from pathlib import Path

import pytest

import experiments

REPO = Path(__file__).resolve().parents[1]


def settings_of(experiment):
    return importlib.import_module(experiment.module)


@pytest.mark.parametrize("experiment", experiments.EXPERIMENTS, ids=lambda e: e.name)
def test_an_entry_changes_only_what_it_names(experiment):
    module = settings_of(experiment)
    start = module.TEMPLATE if experiment.base == "template" else module.DEFAULT
    expected = experiments.expected_settings(experiment)
    fields = {field.name for field in dataclasses.fields(start)}
    assert set(experiment.overrides) <= fields, "an override names no setting of its script"
    changed = {name for name, value in expected.items() if value != getattr(start, name)}
    assert changed == {name for name, value in experiment.overrides.items() if value != getattr(start, name)}
    assert (REPO / experiment.script).exists() and experiment.base in ("default", "template")


def test_names_are_unique_and_commands_are_the_scripts_own():
    names = [experiment.name for experiment in experiments.EXPERIMENTS]
    assert len(names) == len(set(names))
    entry = experiments.Experiment("x", "a3_gan_template.py", "note", {"r1_gamma": 0.0, "lr": 2e-4},
                                   base="template", seed=3)
    assert entry.command("python") == ["python", "a3_gan_template.py", "--resume", "--out",
                                       "results/ablations/x", "--seed", "3", "--template", "--set",
                                       "r1_gamma=0.0", "--set", "lr=0.0002"]
    canonical = experiments.Experiment("y", "a3_vae_template.py", "note", out="results/vae")
    assert canonical.command("python")[:5] == ["python", "a3_vae_template.py", "--resume", "--out",
                                               "results/vae"]
    assert all(entry.folder.is_relative_to(experiments.RESULTS_DIR) for entry in experiments.EXPERIMENTS)


def test_an_extension_module_runs_as_a_module_and_its_settings_are_the_modules():
    """Running extensions/vae_flows.py as a file breaks its imports: the command is python -m, and
    the settings an entry declares are that module's (its fields and its DEFAULT's 80 epochs)."""
    entry = experiments.Experiment("x", "extensions/vae_flows.py", "note", {"posterior": "planar"}, seed=1)
    assert entry.module == "extensions.vae_flows"
    assert entry.command("python") == ["python", "-m", "extensions.vae_flows", "--resume", "--out",
                                       "results/ablations/x", "--seed", "1", "--set", "posterior=planar"]
    settings = experiments.expected_settings(entry)
    assert settings["posterior"] == "planar" and settings["epochs"] == 80 and "iw_estimator" in settings
    multiscale = experiments.Experiment("y", "extensions/nf_multiscale.py", "note", base="template")
    assert multiscale.command("python")[1:3] == ["-m", "extensions.nf_multiscale"]
    assert experiments.expected_settings(multiscale)["n_scales"] == 3  # the module's field, the template's
    assert experiments.expected_settings(multiscale)["lr"] == 1e-3 and \
        experiments.expected_settings(multiscale)["batch_size"] == 128


def extension_runs():
    """The entries of the suite "extensions" whose folder is in results/extensions/ (not a selection
    run of results/ablations/)."""
    return [entry for entry in experiments.EXPERIMENTS
            if entry.suite == "extensions" and entry.folder.parent == experiments.EXTENSIONS_DIR]


def test_the_suites_split_the_assignment_from_what_goes_beyond_it():
    """`make ablations` trains the answer files' entries, `make extensions` the extension modules'
    (their selection runs and their own runs in results/extensions/, each named by its folder)."""
    suites = {suite: {entry.script for entry in experiments.EXPERIMENTS if entry.suite == suite}
              for suite in experiments.SUITES}
    assert suites["ablations"] == {experiments.VAE, experiments.GAN, experiments.NF}
    assert suites["extensions"] == {experiments.VAE_FLOWS, experiments.NF_CONV, experiments.NF_MULTISCALE}
    runs = extension_runs()
    assert {entry.folder.name for entry in runs} == {entry.name for entry in runs}
    assert {"vae_gaussian", "vae_iw5", "vae_iw5_dreg", "vae_iw20", "nf_conv", "nf_conv_variational",
            "nf_multiscale", "nf_multiscale_variational"} <= {entry.name for entry in runs}


def test_from_weights_redraws_only_the_runs_that_have_weights(tmp_path, monkeypatch, capsys):
    """--from_weights runs the script's own command with --from_weights in place of --resume, for the
    runs whose folder holds a weights.pt, and names the others in one line."""
    with_weights = experiments.Experiment("a", "extensions/vae_flows.py", "note", out=str(tmp_path / "a"),
                                          seed=1)
    without = dataclasses.replace(with_weights, name="b", out=str(tmp_path / "b"))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "weights.pt").write_bytes(b"")
    monkeypatch.setattr(experiments, "EXPERIMENTS", (with_weights, without))
    monkeypatch.setattr(experiments, "BY_NAME", {"a": with_weights, "b": without})
    ran = []
    monkeypatch.setattr(experiments.subprocess, "run", lambda command, check: ran.append(command))
    experiments.main(["--suite", "extensions", "--from_weights"])
    assert ran == [[experiments.sys.executable, "-m", "extensions.vae_flows", "--from_weights", "--out",
                    str(tmp_path / "a"), "--seed", "1"]]
    assert capsys.readouterr().out.splitlines()[-1] == "not redrawn, no weights.pt: b"
    ran.clear()
    experiments.main([])  # the ablations suite: neither entry
    assert ran == []


def test_every_run_of_make_extensions_can_commit_its_weights(tmp_path):
    """`make figures` rebuilds the extension runs from their weights.pt: git does not ignore it, and
    the file each run writes (its model's state_dict; the VAE's with its three sample grids) is under
    the harness's WEIGHTS_LIMIT, over which no weights are written."""
    import torch

    import a3_vae_template as vae
    from harness.files import save_weights
    runs = extension_runs()
    assert len(runs) == 14 and sum(entry.seed == 1 for entry in runs) == 4
    git = shutil.which("git") and (REPO / ".git").exists()
    for entry in runs:
        folder = entry.folder
        if git:
            ignored = subprocess.run(["git", "check-ignore", "-q", f"{folder}/weights.pt"], cwd=REPO)
            assert ignored.returncode == 1, f"{folder}/weights.pt is git-ignored"
        module = settings_of(entry)
        start = module.TEMPLATE if entry.base == "template" else module.DEFAULT
        run_settings = dataclasses.replace(start, **entry.overrides)
        if hasattr(module, "FlowVAE"):
            model = module.FlowVAE.from_settings(run_settings)
            epochs = (0, run_settings.epochs // 2, run_settings.epochs)
            entries = {"model": model, "samples": {epoch: vae.grid_samples(model, 42) for epoch in epochs}}
        else:
            entries = {"model": module.build_model(run_settings)}
        with torch.no_grad():
            assert save_weights(tmp_path / "weights.pt", entries) is not None, f"{folder}: over the limit"


def test_the_extensions_candidates_compete_within_their_group():
    """The flow length is chosen per posterior (planar K against planar K, IAF against IAF) at the
    extension's full 80 epochs; the conv and multi-scale flows' learning rate on runs of 4 epochs."""
    groups = {}
    for entry in experiments.EXPERIMENTS:
        if entry.candidate and entry.script.startswith("extensions/"):
            groups.setdefault((entry.script, entry.group), []).append(experiments.expected_settings(entry))
    vae = "extensions/vae_flows.py"
    assert set(groups) == {(vae, "planar"), (vae, "iaf"), ("extensions/nf_couplings.py", ""),
                           ("extensions/nf_multiscale.py", "")}
    for (script, group), members in groups.items():
        varied = {name for name in members[0] if len({str(member[name]) for member in members}) > 1}
        if script == vae:
            assert {member["posterior"] for member in members} == {group}
            assert sorted(member["flow_steps"] for member in members) == \
                {"planar": [4, 8], "iaf": [2, 4]}[group]
            assert varied <= {"flow_steps", "test_importance_samples"}
            assert all(member["epochs"] == 80 for member in members)
        else:
            assert sorted(member["lr"] for member in members) == [5e-4, 1e-3, 2e-3]
            assert varied == {"lr"} and all(member["epochs"] == 4 for member in members)


def test_the_set_values_parse_back_to_the_declared_ones():
    """What the command line carries is read by the script as exactly the entry's value."""
    from harness import settings
    for experiment in experiments.EXPERIMENTS:
        module = settings_of(experiment)
        start = module.TEMPLATE if experiment.base == "template" else module.DEFAULT
        sets = [f"{name}={value}" for name, value in experiment.overrides.items()]
        assert dataclasses.asdict(settings.override(start, sets)) == experiments.expected_settings(experiment)


def test_unknown_names_are_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        experiments.main(["no_such_run"])
    assert exit_info.value.code == 2 and "no experiment no_such_run" in capsys.readouterr().err


def test_list_prints_every_entry_and_runs_nothing(capsys):
    experiments.main(["--list"])
    out = capsys.readouterr().out
    for experiment in experiments.EXPERIMENTS:
        assert f"{experiment.name} ({experiment.suite}): {experiment.note}" in out
