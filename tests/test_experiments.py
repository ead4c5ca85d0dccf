"""experiments.py: every declared entry names real settings of its script, changes only what it
names, and runs as the script's own command."""

import dataclasses
import importlib
from pathlib import Path

import pytest

import experiments

REPO = Path(__file__).resolve().parents[1]


def settings_of(experiment):
    return importlib.import_module(Path(experiment.script).stem)


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
