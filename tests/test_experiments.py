"""experiments.py: every declared entry names real settings of its script, changes only what it
names, and runs as the script's own command (an extension module's with ``python -m``)."""

import dataclasses
import importlib
import re
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


def makefile_runs():
    """{run folder: (module, its --set values, its seed)} of the Makefile's lines
    $(call train,-m <module>,<folder>,<flags>), its variables expanded."""
    text = (REPO / "Makefile").read_text()
    variables = dict(re.findall(r"^([A-Z_0-9]+)\s*=\s*(.*)$", text, re.M))

    def expand(flags):
        return re.sub(r"\$\(([A-Z_0-9]+)\)", lambda match: expand(variables[match.group(1)]), flags)

    runs = {}
    for line in re.findall(r"^\t\$\(call train,(.*)\)$", text, re.M):
        script, folder, *flags = expand(line).split(",", 2)
        if not script.startswith("-m "):
            continue
        module, words = script.removeprefix("-m "), (flags[0] if flags else "").split()
        sets = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
        seed = int(words[words.index("--seed") + 1]) if "--seed" in words else 42
        runs[folder] = (module, sets, seed)
    return runs


def test_the_extension_entries_that_are_runs_of_make_extensions_train_as_it_does():
    """An entry whose folder is a run of `make extensions` declares exactly that run's settings and
    seed (it would otherwise retrain it differently, or be refused its checkpoint)."""
    from harness import settings
    runs = makefile_runs()
    assert {"results/extensions/vae_gaussian", "results/extensions/nf_multiscale"} <= runs.keys()
    shared = [entry for entry in experiments.EXPERIMENTS
              if entry.folder.parts[:2] == ("results", "extensions")]
    assert {entry.name for entry in shared} == {"vae_planar_k8", "vae_iaf_k4"}
    for entry in shared:
        module, sets, seed = runs[str(entry.folder)]
        assert module == entry.module and seed == entry.seed
        made = dataclasses.asdict(settings.override(settings_of(entry).DEFAULT, sets))
        assert made == experiments.expected_settings(entry)


def test_every_run_of_make_extensions_can_commit_its_weights(tmp_path):
    """`make figures` rebuilds the extension runs from their weights.pt: git does not ignore it, and
    the file each run writes (its model's state_dict; the VAE's with its three sample grids) is under
    the harness's WEIGHTS_LIMIT, over which no weights are written."""
    import torch

    import a3_vae_template as vae
    from harness import settings
    from harness.files import save_weights
    runs = makefile_runs()
    assert len(runs) == 14 and sum(seed == 1 for _, _, seed in runs.values()) == 4
    git = shutil.which("git") and (REPO / ".git").exists()
    for folder, (module_name, sets, _) in runs.items():
        if git:
            ignored = subprocess.run(["git", "check-ignore", "-q", f"{folder}/weights.pt"], cwd=REPO)
            assert ignored.returncode == 1, f"{folder}/weights.pt is git-ignored"
        module = importlib.import_module(module_name)
        run_settings = settings.override(module.DEFAULT, sets)
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
        assert f"{experiment.name}: {experiment.note}" in out
