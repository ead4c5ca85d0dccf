"""harness/: flags, settings and --set, the run (seeds, log, checkpoint, resume, metrics.json and its
schema, weights and the rebuild from them), the one-line errors of ``cli``, the training precision
and the figures."""

import argparse
import dataclasses
import json
import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import needs_amx

from datasets.raw import ChecksumError, DataError
from harness import figures, files, schema, settings
from harness import run as harness_run
from harness.files import RunError

# ---------------------------------------------------------------- flags

@pytest.mark.parametrize("text, value", [("1", 1), ("128", 128)])
def test_positive_int_accepts(text, value):
    assert harness_run.positive_int(text) == value


@pytest.mark.parametrize("text", ["0", "-3"])
def test_positive_int_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError, match="positive integer"):
        harness_run.positive_int(text)


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("2.5", 2.5)])
def test_positive_float_accepts(text, value):
    assert harness_run.positive_float(text) == value


@pytest.mark.parametrize("text", ["0", "-1e-3", "nan", "inf"])
def test_positive_float_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError, match="positive number"):
        harness_run.positive_float(text)


def test_bad_numbers_are_argparse_errors(capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=harness_run.positive_int)
    for bad in ("0", "1.5", "ten"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["--epochs", bad])
        assert exit_info.value.code == 2
        assert "--epochs" in capsys.readouterr().err


DOC = """Train something.

    python train.py --out results/x      # an indented example line
"""


def run_parser():
    return harness_run.add_run_args(harness_run.argument_parser(DOC), out="results/test")


def test_run_flags_and_their_defaults():
    args = run_parser().parse_args([])
    assert vars(args) == {"template": False, "overrides": [], "out": "results/test", "resume": False,
                          "from_weights": False, "seed": 42, "device": "auto", "precision": "auto",
                          "data_root": None}
    args = run_parser().parse_args(["--template", "--resume", "--seed", "3", "--device", "cpu",
                                    "--precision", "fp32"])
    assert (args.template, args.resume, args.seed, args.device, args.precision) == (True, True, 3, "cpu",
                                                                                    "fp32")


def test_help_shows_the_docstring_as_written():
    example = "\n    python train.py --out results/x      # an indented example line\n"
    assert example in run_parser().format_help()


@pytest.mark.parametrize("flag, value", [("--precision", "fp16"), ("--device", "tpu")])
def test_unknown_choices_are_argparse_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_parser().parse_args([flag, value])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_missing_data_root_is_a_clear_argparse_error(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(SystemExit) as exit_info:
        run_parser().parse_args(["--data_root", str(missing)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--data_root" in err and str(missing) in err and "does not exist" in err
    assert not missing.exists()
    assert run_parser().parse_args(["--data_root", str(tmp_path)]).data_root == str(tmp_path)


def test_flags_are_spelled_with_underscores(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_parser().parse_args(["--data-root", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --data-root" in capsys.readouterr().err


# ---------------------------------------------------------------- device, seeds, precision

def test_get_device():
    assert harness_run.get_device("cpu") == torch.device("cpu")
    assert harness_run.get_device("auto").type in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        with pytest.raises(RunError, match="--device cuda"):
            harness_run.get_device("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(RunError, match="--device mps"):
            harness_run.get_device("mps")


def draws():
    """One number from each RNG a training run uses."""
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()


def test_seed_everything_seeds_all_three_generators():
    harness_run.seed_everything(5)
    first = draws()
    harness_run.seed_everything(5)
    assert draws() == first
    harness_run.seed_everything(6)
    assert draws() != first


@pytest.mark.parametrize("amx", [True, False])
def test_auto_precision_is_bf16_on_cpus_with_amx_only(amx, monkeypatch):
    monkeypatch.setattr(harness_run, "has_amx", lambda: amx)
    cpu = torch.device("cpu")
    assert harness_run.resolve_precision("auto", cpu) == ("bf16" if amx else "fp32")
    assert harness_run.resolve_precision("auto", torch.device("cuda")) == "fp32"
    assert harness_run.resolve_precision("fp32", cpu) == "fp32"
    assert harness_run.resolve_precision("bf16", cpu) == "bf16"  # asked for: the user's choice
    with pytest.raises(RunError, match="--precision bf16"):
        harness_run.resolve_precision("bf16", torch.device("cuda"))


def test_matmul_precision_sets_and_restores_onednn_matmul_precision():
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    with harness_run.matmul_precision("bf16"):
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
    with pytest.raises(RuntimeError, match="a failing step"), harness_run.matmul_precision("bf16"):
        raise RuntimeError("a failing step")
    assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"


def test_matmul_precision_is_a_no_op_for_fp32():
    for setting in ("ieee", "none"):
        torch.backends.mkldnn.matmul.fp32_precision = setting
        with harness_run.matmul_precision("fp32"):
            assert torch.backends.mkldnn.matmul.fp32_precision == setting
        assert torch.backends.mkldnn.matmul.fp32_precision == setting


def test_a_run_chooses_its_precision_once_and_changes_nothing_process_wide(tmp_path, monkeypatch):
    monkeypatch.setattr(harness_run, "has_amx", lambda: True)
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    assert harness_run.Run(run_args(tmp_path, precision="auto"), Toy()).precision == "bf16"
    assert harness_run.Run(run_args(tmp_path, precision="fp32"), Toy()).precision == "fp32"
    assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"  # only matmul_precision() sets it


@needs_amx
def test_bf16_training_matmuls_round_the_inputs_of_fp32_matmuls(monkeypatch):
    """When a run chose bf16, an fp32 product inside the training context equals the fp32 product of
    the inputs rounded to bf16 (to fp32 summation error), with fp32 output; outside it is fp32."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 256, generator=generator), torch.randn(256, 32, generator=generator)
    exact = a.double() @ b.double()
    rounded = a.bfloat16().double() @ b.bfloat16().double()
    with harness_run.matmul_precision("bf16"):
        inside = a @ b
    assert inside.dtype == torch.float32
    torch.testing.assert_close((a @ b).double(), exact, rtol=1e-5, atol=1e-4)
    assert (inside.double() - exact).abs().max() > 1e-2  # bf16 keeps 8 bits: really rounded
    torch.testing.assert_close(inside.double(), rounded, rtol=1e-5, atol=1e-4)


def test_check_finite_raises_a_run_error_naming_where():
    harness_run.check_finite(torch.tensor(1.5), "epoch 1")
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(RunError, match="at epoch 2 step 7.*--resume"):
            harness_run.check_finite(torch.tensor(bad), "epoch 2 step 7")


# ---------------------------------------------------------------- settings

@dataclasses.dataclass(frozen=True)
class Choices:
    """Settings of every kind a script has."""
    epochs: int = 40
    lr: float = 1e-3
    dynamic: bool = True
    clip: float | None = 100.0
    coupling: str = "mlp"


def resolved(*argv):
    args = run_parser().parse_args(argv)
    return settings.resolve(args, Choices(), Choices(epochs=3, dynamic=False, clip=None))


def test_set_overrides_each_kind_of_field_by_its_type():
    assert resolved() == Choices()
    assert resolved("--template") == Choices(epochs=3, dynamic=False, clip=None)
    assert resolved("--set", "epochs=7", "--set", "lr=2e-4", "--set", "dynamic=false", "--set", "clip=none",
                    "--set", "coupling=conv") == Choices(7, 2e-4, False, None, "conv")
    assert resolved("--template", "--set", "clip=0.5", "--set", "dynamic=yes") == \
        Choices(epochs=3, dynamic=True, clip=0.5)
    assert isinstance(resolved("--set", "lr=1").lr, float)  # "1" read as the field's type


@pytest.mark.parametrize("assignment, message", [
    ("epoch=3", "no setting 'epoch' (the settings are: epochs, lr, dynamic, clip, coupling)"),
    ("epochs", "write name=value"),
    ("epochs=3.5", "epochs is an int"),
    ("lr=fast", "lr is a float"),
    ("lr=-1", "lr is a finite number >= 0"),
    ("clip=inf", "clip is a finite number >= 0"),
    ("dynamic=maybe", "dynamic is true or false"),
])
def test_a_bad_set_is_one_line_naming_it(assignment, message):
    with pytest.raises(SystemExit) as exit_info:
        resolved("--set", assignment)
    assert exit_info.value.code == f"error: --set {assignment}: {message}"


def test_settings_differences_and_description():
    changed = Choices(epochs=3, coupling="conv")
    assert settings.differences(changed, Choices()) == {"epochs": 3, "coupling": "conv"}
    assert settings.describe(changed) == "epochs=3 lr=0.001 dynamic=True clip=100.0 coupling=conv"
    assert settings.as_dict(changed)["epochs"] == 3


# ---------------------------------------------------------------- metrics.json

def a_record(**changes):
    return {**{key: None for key in schema.REQUIRED}, "schema_version": schema.SCHEMA_VERSION, **changes}


def test_schema_writes_and_reads_a_record_and_refuses_other_shapes(tmp_path):
    record = a_record(settings={"epochs": 2}, test={"bpd": 1.5})
    text = schema.write(tmp_path / "metrics.json", record)
    assert schema.read(tmp_path) == schema.read(tmp_path / "metrics.json") == record
    assert text == (tmp_path / "metrics.json").read_text()
    with pytest.raises(schema.SchemaError, match=r"missing \['seed'\], undeclared \['bpd'\]"):
        schema.write(tmp_path / "bad.json", {**{k: v for k, v in record.items() if k != "seed"}, "bpd": 1})
    (tmp_path / "old.json").write_text(json.dumps({"args": {"epochs": 2}, "curves": {}}))
    with pytest.raises(schema.SchemaError, match="old.json: metrics.json of schema"):
        schema.read(tmp_path / "old.json")
    (tmp_path / "next.json").write_text(json.dumps(a_record(schema_version=schema.SCHEMA_VERSION + 1)))
    with pytest.raises(schema.SchemaError, match=f"is of schema {schema.SCHEMA_VERSION + 1}"):
        schema.read(tmp_path / "next.json")


def test_same_numbers_compares_floats_to_a_relative_tolerance():
    same = harness_run.same_numbers
    assert same({"a": [1.0, 2, "x"], "b": None}, {"a": [1.0 + 1e-9, 2, "x"], "b": None})
    assert not same({"a": 1.0}, {"a": 1.01})
    assert not same({"a": [1.0]}, {"a": [1.0, 2.0]})
    assert not same({"a": 1.0}, {"b": 1.0})
    assert not same({"a": "1.0"}, {"a": 1.0})


# ---------------------------------------------------------------- files and checkpoints

def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "metrics.json"
    files.atomic_write(path, lambda tmp: tmp.write_text('{"epoch": 1}'))

    def crash(tmp):
        tmp.write_text('{"epo')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(path, crash)
    assert json.loads(path.read_text()) == {"epoch": 1}


def test_write_text_if_changed_leaves_an_equal_file_untouched(tmp_path):
    path = tmp_path / "sub" / "table.md"
    assert files.write_text_if_changed(path, "a\n") and path.read_text() == "a\n"
    mtime = path.stat().st_mtime_ns
    assert not files.write_text_if_changed(path, "a\n") and path.stat().st_mtime_ns == mtime
    assert files.write_text_if_changed(path, "b\n") and path.read_text() == "b\n"
    assert not list((tmp_path / "sub").glob("*.tmp"))


def test_git_commit_names_the_checked_out_commit():
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", files.git_commit())


def test_load_checkpoint_refuses_a_missing_file(tmp_path):
    with pytest.raises(RunError, match="does not exist: train the model first"):
        files.load_checkpoint(tmp_path / "checkpoint.pt")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", bytes(range(256)) * 4])
def test_load_checkpoint_refuses_a_garbage_file(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(RunError, match="cannot be read as a checkpoint"):
        files.load_checkpoint(path)


@pytest.mark.parametrize("payload", [{"model": {}}, {"settings": {}, "seed": 1, "state": {}}, [1, 2, 3],
                                     torch.zeros(3)], ids=["other keys", "no epoch", "list", "tensor"])
def test_load_checkpoint_refuses_what_run_save_did_not_write(tmp_path, payload):
    path = tmp_path / "checkpoint.pt"
    torch.save(payload, path)
    with pytest.raises(RunError, match="is not a checkpoint of this code"):
        files.load_checkpoint(path)


# ---------------------------------------------------------------- the run harness

@dataclasses.dataclass(frozen=True)
class Toy:
    """A script's settings: two fields."""
    z_dim: int = 2
    epochs: int = 2


def run_args(out, **changes):
    """The flags every script has."""
    return SimpleNamespace(**{"template": False, "overrides": [], "out": str(out), "resume": False,
                              "from_weights": False, "seed": 42, "device": "cpu", "precision": "fp32",
                              "data_root": str(out), **changes})


def model_and_optimizer(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    return model, optimizer


class FakeClock:
    """perf_counter that advances by the given steps, one per call (then stands still)."""

    def __init__(self, *steps):
        self.now, self.steps = 100.0, iter(steps)

    def __call__(self):
        self.now += next(self.steps, 0.0)
        return self.now


def test_a_new_run_seeds_flushes_denormals_and_starts_its_log(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.log").write_text("a previous run's log\n")
    torch.set_flush_denormal(False)
    denormal = torch.tensor([1e-39])  # below float32's smallest normal number, 1.18e-38
    assert (denormal * 1.0).item() != 0

    run = harness_run.Run(run_args(out, seed=5, data_root=str(tmp_path / "data")), Toy())
    first = draws()
    harness_run.seed_everything(5)
    assert draws() == first
    assert (denormal * 1.0).item() == 0
    assert (run.device, run.precision, run.epoch, run.curves) == (torch.device("cpu"), "fp32", 0, {})
    assert (tmp_path / "data").is_dir() and run.data_root == str(tmp_path / "data")
    log = (out / "train.log").read_text().splitlines()
    assert len(log) == 1  # the old log is gone
    # What the run computes is named; where it runs and writes is not.
    assert log[0].endswith(": z_dim=2 epochs=2 seed=5 | cpu, training matmuls in fp32")
    assert run.restore(model=torch.nn.Linear(1, 1)) == {}  # nothing to resume


def test_data_root_defaults_to_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = harness_run.Run(run_args(tmp_path / "out", data_root=None), Toy())
    assert run.data_root == harness_run.DEFAULT_DATA_ROOT and (tmp_path / "data").is_dir()


def test_epochs_timing_curves_and_checkpoint_round_trip(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(harness_run.time, "perf_counter", FakeClock(0.0, 2.5, 0.0, 1.5))
    run = harness_run.Run(run_args(out), Toy())
    model, optimizer = model_and_optimizer(0)
    assert list(run.epochs(3)) == [1, 2, 3]
    run.record(loss=5.0)  # epoch 0: the untrained model
    for epoch in (1, 2):
        with run.timed(n_images=100):
            pass
        assert run.epoch == epoch
        run.record(loss=1.0 / epoch)
    assert run.curves == {"loss": [5.0, 1.0, 0.5], "wall_time_s": [0.0, 2.5, 4.0]}
    assert (run.seconds, run.images) == (4.0, 200)
    harness_run.seed_everything(123)
    run.save({"samples": [1, 2]}, model=model, optimizer=optimizer)
    expected_draws = draws()
    log = (out / "train.log").read_text()
    assert "epoch 0  loss 5\n" in log and "epoch 2  loss 0.5  (1.5 s)\n" in log

    other_model, other_optimizer = model_and_optimizer(1)
    harness_run.seed_everything(999)
    resumed = harness_run.Run(run_args(out, resume=True), Toy())
    assert resumed.restore(model=other_model, optimizer=other_optimizer) == {"samples": [1, 2]}
    assert draws() == expected_draws, "the next random numbers after resume must be the saved ones"
    assert (resumed.epoch, resumed.curves, resumed.seconds, resumed.images) == (
        2, run.curves, 4.0, 200)
    assert list(resumed.epochs(3)) == [3] and list(resumed.epochs(2)) == []
    for name, tensor in model.state_dict().items():
        assert torch.equal(other_model.state_dict()[name], tensor)
    saved, restored = optimizer.state_dict(), other_optimizer.state_dict()
    assert saved["param_groups"] == restored["param_groups"]
    for index, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(restored["state"][index][key], value)
    log = (out / "train.log").read_text()
    assert "epoch 2  loss 0.5" in log and f"resumed from {out / 'checkpoint.pt'} after epoch 2" in log


def test_a_run_killed_before_its_first_save_starts_afresh_on_resume(tmp_path):
    run = harness_run.Run(run_args(tmp_path, resume=True), Toy())
    assert not run.resuming and run.restore(model=torch.nn.Linear(1, 1)) == {}


def test_restore_refuses_a_checkpoint_of_other_settings_and_names_them(tmp_path):
    harness_run.Run(run_args(tmp_path), Toy()).save(model=torch.nn.Linear(2, 2))
    for toy, changes, named in ((Toy(z_dim=3), {}, "z_dim=2 (asked: 3)"),
                                (Toy(epochs=5), {"seed": 1}, "epochs=2 (asked: 5), seed=42 (asked: 1)")):
        run = harness_run.Run(run_args(tmp_path, resume=True, **changes), toy)
        with pytest.raises(RunError) as error:
            run.restore(model=torch.nn.Linear(2, 2))
        assert f"was trained with {named}: rerun with its settings" in str(error.value)


def test_restore_accepts_other_output_device_precision_and_data_flags(tmp_path):
    model = torch.nn.Linear(2, 2)
    harness_run.Run(run_args(tmp_path), Toy()).save(model=model)
    other = torch.nn.Linear(2, 2)
    run = harness_run.Run(run_args(tmp_path, resume=True, device="auto", precision="auto",
                                   data_root=str(tmp_path / "elsewhere")), Toy())
    run.restore(model=other)
    assert torch.equal(other.weight, model.weight)


def test_finish_writes_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setattr(harness_run.time, "perf_counter", FakeClock(0.0, 4.0))
    run = harness_run.Run(run_args(tmp_path, seed=7), Toy(z_dim=3))
    with run.timed(n_images=600):
        pass
    run.record(loss=2.0)
    model = torch.nn.Linear(4, 3)
    metrics = run.finish(model, {"test": {"bpd": 1.5}}, milestones={"halfway": 1},
                         figures={"samples_end": "samples_end"})
    assert schema.read(tmp_path) == metrics == json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["schema_version"] == schema.SCHEMA_VERSION
    assert (metrics["settings"], metrics["seed"]) == ({"z_dim": 3, "epochs": 2}, 7)
    assert (metrics["milestones"], metrics["figures"]) == ({"halfway": 1}, {"samples_end": "samples_end"})
    assert (metrics["n_params"], metrics["epochs_completed"], metrics["wall_time_s"]) == (15, 1, 4.0)
    assert metrics["images_per_s"] == 150.0
    assert metrics["curves"] == {"loss": [2.0], "wall_time_s": [4.0]}
    assert metrics["test"] == {"bpd": 1.5}
    assert (metrics["device"], metrics["training_precision"], metrics["torch"]) == ("cpu", "fp32",
                                                                                    torch.__version__)
    assert metrics["threads"] == torch.get_num_threads()
    assert metrics["git_commit"] == files.git_commit()
    for key in ("command", "device_name", "finished"):
        assert metrics[key]
    assert "done: 0.1 min of training" in (tmp_path / "train.log").read_text()


# ---------------------------------------------------------------- weights and the rebuild from them

def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_weights_round_trip_weights_only_and_a_flipped_byte_is_refused(tmp_path):
    model = torch.nn.Linear(4, 3)
    samples = {0: (torch.ones(2, 784, dtype=torch.uint8), torch.rand(2, 784))}
    path = tmp_path / "weights.pt"
    digest = files.save_weights(path, {"model": model, "samples": samples})
    assert digest == files.sha256(path.read_bytes())
    plain = torch.load(path, weights_only=True)  # a plain file of tensors: no code is unpickled
    assert set(plain) == {"model", "samples"} and torch.equal(plain["model"]["weight"], model.weight)
    loaded = files.load_verified(path, digest)
    assert torch.equal(loaded["samples"][0][1], samples[0][1])
    assert loaded["samples"][0][0].dtype == torch.uint8
    flip_a_byte(path)
    with pytest.raises(RunError, match="is corrupted or from another run"):
        files.load_verified(path, digest)
    with pytest.raises(RunError, match="does not exist"):
        files.load_verified(tmp_path / "missing.pt", digest)


def test_weights_over_the_limit_are_not_written(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "WEIGHTS_LIMIT", 1000)
    path = tmp_path / "weights.pt"
    path.write_bytes(b"an old run's weights")
    assert files.save_weights(path, {"model": torch.nn.Linear(100, 100)}) is None
    assert not path.exists()


def toy_main(out, toy=Toy(), **flags):
    """A toy script's main: train a Linear model for 2 epochs (or, with --from_weights, load it), then
    measure it and finish, keeping a figure's data (``grid``) from training in its weights. Returns
    (metrics, epochs trained, grid)."""
    run = harness_run.Run(run_args(out, **flags), toy)
    model, optimizer = model_and_optimizer(0)
    trained = []
    if run.from_weights:
        extra = run.load_weights(model=model)
    else:
        extra = run.restore(model=model, optimizer=optimizer)
        for epoch in run.epochs(toy.epochs):
            with run.timed(n_images=10):
                trained.append(epoch)
                model.weight.data += 1.0
            run.record(loss=float(epoch))
            run.save(model=model, optimizer=optimizer)
    grid = extra.get("grid", torch.arange(3) + len(trained))
    # Like the GAN's progress curve, which needs training-time snapshots: empty when rebuilt.
    progress = [{"epoch": 1}] if trained else []
    results = {"test": {"measured": model(torch.ones(1, 4)).sum().item()}, "progress": progress}
    metrics = run.finish(model, results, weights={"model": model, "grid": grid}, milestones={"halfway": 1})
    return metrics, trained, grid


def test_a_run_rebuilt_from_its_weights_trains_nothing_and_reproduces_its_measures(tmp_path):
    out = tmp_path / "run"
    trained_metrics, trained, grid = toy_main(out)
    assert trained == [1, 2]
    assert trained_metrics["weights_sha256"] == files.sha256((out / "weights.pt").read_bytes())
    (out / "checkpoint.pt").unlink()  # a clean clone: metrics.json and weights.pt only
    kept = {name: (out / name).read_bytes() for name in ("metrics.json", "train.log")}

    rebuilt, trained, rebuilt_grid = toy_main(out, from_weights=True)
    assert trained == [] and not (out / "checkpoint.pt").exists()
    assert torch.equal(rebuilt_grid, grid)  # the weights' other entries come back to main
    # Every measure equals the record, so nothing is written: a clean clone stays clean.
    assert rebuilt == trained_metrics and "rebuilt" not in rebuilt
    assert {name: (out / name).read_bytes() for name in kept} == kept

    # A number that differs from the record is written, with what rebuilt it.
    recorded = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").write_text(json.dumps({**recorded, "test": {"measured": -1.0}}))
    rebuilt, _, _ = toy_main(out, from_weights=True)
    assert rebuilt["test"] == trained_metrics["test"]  # measured again from the weights
    # The record of training stays; an empty result keeps its recorded value.
    for key in ("command", "git_commit", "finished", "wall_time_s", "curves", "weights_sha256", "settings",
                "seed", "progress"):
        assert rebuilt[key] == trained_metrics[key]
    assert rebuilt["rebuilt"]["git_commit"] == files.git_commit()
    assert schema.read(out) == rebuilt
    assert (out / "train.log").read_bytes() == kept["train.log"]  # a rebuild never appends to the log


def test_a_rebuild_refuses_corrupted_weights_other_flags_and_runs_without_weights(tmp_path, monkeypatch):
    out = tmp_path / "run"
    toy_main(out)
    with pytest.raises(RunError, match="was trained with epochs=2 \\(asked: 3\\)"):
        harness_run.Run(run_args(out, from_weights=True), Toy(epochs=3))
    flip_a_byte(out / "weights.pt")
    run = harness_run.Run(run_args(out, from_weights=True), Toy())
    with pytest.raises(RunError, match="weights.pt has SHA-256 .* the file is corrupted"):
        run.load_weights(model=torch.nn.Linear(4, 3))
    with pytest.raises(RunError, match="needs the metrics.json of a finished run"):
        harness_run.Run(run_args(tmp_path / "empty", from_weights=True), Toy())
    monkeypatch.setattr(files, "WEIGHTS_LIMIT", 10)  # as the MLP flow's: no weights are kept
    toy_main(tmp_path / "large")
    assert not (tmp_path / "large" / "weights.pt").exists()
    with pytest.raises(RunError, match="records no weights"):
        harness_run.Run(run_args(tmp_path / "large", from_weights=True), Toy())


# ---------------------------------------------------------------- cli

@pytest.mark.parametrize("error", [DataError("MNIST files missing from data/MNIST/raw"),
                                   ChecksumError("data/x is corrupted"),
                                   RunError("the loss became nan at epoch 3")])
def test_cli_turns_data_and_run_errors_into_one_line(error):
    def main():
        raise error

    with pytest.raises(SystemExit) as exit_info:
        harness_run.cli(main)
    assert exit_info.value.code == f"error: {error}"  # SystemExit with a message exits with status 1


def test_cli_says_how_to_continue_after_ctrl_c():
    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit, match="interrupted: .*continue with --resume"):
        harness_run.cli(main)


def test_cli_leaves_other_errors_and_success_alone():
    def broken():
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        harness_run.cli(broken)
    ran = []
    assert harness_run.cli(lambda: ran.append(1)) is None and ran == [1]


# ---------------------------------------------------------------- figures

def test_image_grid_layout():
    images = torch.arange(1, 6, dtype=torch.float32)[:, None, None, None].expand(5, 1, 3, 4) / 10
    grid = figures.image_grid(images, nrow=3, padding=2, pad_value=1.0)
    assert grid.shape == (2 * (3 + 2) + 2, 3 * (4 + 2) + 2)
    expected = np.ones(grid.shape, dtype=np.float32)
    for i in range(5):
        r, c = divmod(i, 3)
        expected[2 + 5 * r:2 + 5 * r + 3, 2 + 6 * c:2 + 6 * c + 4] = (i + 1) / 10
    np.testing.assert_allclose(grid, expected)


def test_image_grid_accepts_three_dimensional_and_flat_input():
    images = torch.rand(3, 28, 28)
    grid = figures.image_grid(images, nrow=2, padding=0)
    assert grid.shape == (56, 56)
    np.testing.assert_array_equal(grid[28:, :28], images[2].numpy())
    np.testing.assert_array_equal(figures.image_grid(images.reshape(3, 784), nrow=2, padding=0), grid)


def assert_png_and_pdf(stem):
    assert stem.with_suffix(".png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert stem.with_suffix(".pdf").read_bytes().startswith(b"%PDF")


@pytest.fixture
def drawn(monkeypatch):
    """The figures handed to save_figure, inspected before they are written."""
    drawn_figures = []
    save_figure = figures.save_figure

    def keep(fig, stem):
        ax = fig.axes[0]
        drawn_figures.append({"fig_size": tuple(fig.get_size_inches()), "title": ax.get_title(),
                        "ylim": ax.get_ylim(), "yticklabels": [t.get_text() for t in ax.get_yticklabels()],
                        "lines": [(line.get_label(), list(line.get_xdata()), list(line.get_ydata()))
                                  for line in ax.get_lines()],
                        "image": ax.images[0].get_array() if ax.images else None})
        save_figure(fig, stem)

    monkeypatch.setattr(figures, "save_figure", keep)
    return drawn_figures


def test_save_image_grid_draws_the_grid_with_row_labels_and_no_title(tmp_path, drawn):
    images = torch.rand(12, 1, 28, 28)
    stem = tmp_path / "figures" / "samples"
    figures.save_image_grid(images, stem, nrow=4, row_labels=["1→7", "2→3", "0→9"], width=4.5)
    assert_png_and_pdf(stem)
    (figure,) = drawn
    np.testing.assert_array_equal(figure["image"], figures.image_grid(images, nrow=4))
    assert figure["yticklabels"] == ["1→7", "2→3", "0→9"] and figure["title"] == ""
    assert figure["fig_size"][0] == 4.5
    figures.save_image_grid(torch.rand(3, 28, 28), tmp_path / "plain", nrow=3)
    assert_png_and_pdf(tmp_path / "plain")
    assert drawn[1]["yticklabels"] == [] and drawn[1]["fig_size"][0] == 3.0


def test_save_curves_draws_every_curve_from_its_start_with_references_and_range(tmp_path, drawn):
    stem = tmp_path / "curves"
    figures.save_curves({"train": [3.0, 2.0, 1.5], "val": [3.1, 2.2, 1.9]}, stem, ylabel="bpd", start=1,
                       references={"bar": 1.85}, ylim=(1.0, 4.0))
    assert_png_and_pdf(stem)
    (figure,) = drawn
    assert figure["lines"][:2] == [("train", [1, 2, 3], [3.0, 2.0, 1.5]), ("val", [1, 2, 3], [3.1, 2.2, 1.9])]
    label, _, level = figure["lines"][2]
    assert label == "bar (1.85)" and level == [1.85, 1.85]
    assert figure["ylim"] == (1.0, 4.0)


def test_a_redrawn_figure_is_the_same_file(tmp_path):
    """No creation date in the PDF: redrawing an unchanged figure leaves a committed file as it was."""
    for name in ("first", "second"):
        figures.save_curves({"train": [3.0, 2.0]}, tmp_path / name, ylabel="bpd")
    for suffix in (".png", ".pdf"):
        assert (tmp_path / "first").with_suffix(suffix).read_bytes() == \
            (tmp_path / "second").with_suffix(suffix).read_bytes()


def test_one_of_names_the_field_and_its_choices():
    @dataclasses.dataclass(frozen=True)
    class Choice:
        kind: str = "a"

    settings.one_of(Choice(), "kind", ("a", "b"))
    with pytest.raises(settings.SettingsError, match=r"^--set kind=c: kind is one of a, b$"):
        settings.one_of(Choice("c"), "kind", ("a", "b"))
