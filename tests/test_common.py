"""common.py: flags, checkpoints with RNG state, figures, finiteness checks, timing, run info."""

import argparse
import json
import random
import re

import numpy as np
import pytest
import torch
from conftest import needs_amx

import common

# ---------------------------------------------------------------- flags

@pytest.mark.parametrize("text, value", [("1", 1), ("128", 128)])
def test_positive_int_accepts(text, value):
    assert common.positive_int(text) == value


@pytest.mark.parametrize("text", ["0", "-3"])
def test_positive_int_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError, match="positive integer"):
        common.positive_int(text)


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("2.5", 2.5)])
def test_positive_float_accepts(text, value):
    assert common.positive_float(text) == value


@pytest.mark.parametrize("text", ["0", "-1e-3", "nan", "inf"])
def test_positive_float_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError, match="positive number"):
        common.positive_float(text)


def test_bad_numbers_are_argparse_errors(capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=common.positive_int)
    for bad in ("0", "1.5", "ten"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["--epochs", bad])
        assert exit_info.value.code == 2
        assert "--epochs" in capsys.readouterr().err


def common_parser():
    return common.add_common_args(argparse.ArgumentParser(prog="train"), out="results/test")


def test_missing_data_root_is_a_clear_argparse_error(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(SystemExit) as exit_info:
        common_parser().parse_args(["--data-root", str(missing)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--data-root" in err and str(missing) in err and "does not exist" in err
    assert not missing.exists()


def test_common_args_defaults_and_existing_data_root(tmp_path, monkeypatch):
    args = common_parser().parse_args([])
    assert (args.device, args.seed, args.data_root, args.out, args.resume) == (
        "auto", 42, None, "results/test", False)
    monkeypatch.chdir(tmp_path)
    assert common.data_root(args) == common.DEFAULT_DATA_ROOT
    assert (tmp_path / common.DEFAULT_DATA_ROOT).is_dir()
    args = common_parser().parse_args(["--data-root", str(tmp_path), "--resume"])
    assert common.data_root(args) == str(tmp_path) and args.resume


def test_get_device():
    assert common.get_device("cpu") == torch.device("cpu")
    assert common.get_device("auto").type in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA"):
            common.get_device("cuda")


def draws():
    """One number from each RNG a training run uses."""
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()


def test_seed_everything_seeds_all_three_generators():
    common.seed_everything(5)
    first = draws()
    common.seed_everything(5)
    assert draws() == first
    common.seed_everything(6)
    assert draws() != first


def test_setup_seeds_picks_the_device_and_flushes_denormals(tmp_path):
    args = common_parser().parse_args(["--device", "cpu", "--seed", "5", "--data-root", str(tmp_path)])
    try:
        torch.set_flush_denormal(False)
        denormal = torch.tensor([1e-39])  # below float32's smallest normal number, 1.18e-38
        assert (denormal * 1.0).item() != 0
        assert common.setup(args) == (torch.device("cpu"), str(tmp_path))
        first = draws()
        assert (denormal * 1.0).item() == 0
    finally:
        torch.set_flush_denormal(False)
    common.seed_everything(5)
    assert draws() == first


# ---------------------------------------------------------------- checkpoints and metrics

def trained_model_and_optimizer(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    return model, optimizer


@needs_amx
def test_bf16_matmuls_round_the_inputs_of_fp32_matmuls_inside_the_region_only():
    """Inside the region an fp32 product equals the fp32 product of the inputs rounded to bf16 (to
    fp32 summation error), with fp32 output; outside, and after an error inside, it is fp32 again."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 256, generator=generator), torch.randn(256, 32, generator=generator)
    exact = a.double() @ b.double()
    rounded = a.bfloat16().double() @ b.bfloat16().double()
    with common.bf16_matmuls("bf16", torch.device("cpu")):
        inside = a @ b
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside.double(), rounded, rtol=1e-5, atol=1e-4)
    assert (inside.double() - exact).abs().max() > 1e-2  # bf16 keeps 8 bits: really rounded
    with pytest.raises(RuntimeError), common.bf16_matmuls("bf16", torch.device("cpu")):
        raise RuntimeError("a failing step")
    torch.testing.assert_close((a @ b).double(), exact, rtol=1e-5, atol=1e-4)
    with common.bf16_matmuls("fp32", torch.device("cpu")):
        torch.testing.assert_close((a @ b).double(), exact, rtol=1e-5, atol=1e-4)


def test_checkpoint_round_trip_restores_model_optimizer_values_and_rng(tmp_path):
    model, optimizer = trained_model_and_optimizer(0)
    path = tmp_path / "run" / "checkpoint.pt"
    common.seed_everything(123)
    common.save_checkpoint(path, model=model, optimizer=optimizer, epoch=3, curves={"loss": [1.0, 0.5]})
    expected_draws = draws()
    assert path.exists() and not list(path.parent.glob("*.tmp"))

    other_model, other_optimizer = trained_model_and_optimizer(1)
    assert not torch.equal(other_model.weight, model.weight)
    common.seed_everything(999)
    payload = common.load_checkpoint(path, model=other_model, optimizer=other_optimizer)

    assert draws() == expected_draws, "the next random numbers after resume must be the saved ones"
    assert payload["epoch"] == 3 and payload["curves"] == {"loss": [1.0, 0.5]}
    for name, tensor in model.state_dict().items():
        assert torch.equal(other_model.state_dict()[name], tensor)
    saved, restored = optimizer.state_dict(), other_optimizer.state_dict()
    assert saved["param_groups"] == restored["param_groups"]
    for index, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(restored["state"][index][key], value)


def test_load_checkpoint_can_leave_rng_alone(tmp_path):
    common.save_checkpoint(tmp_path / "c.pt", step=1)
    common.seed_everything(7)
    expected = draws()
    common.seed_everything(7)
    assert common.load_checkpoint(tmp_path / "c.pt", restore_rng=False)["step"] == 1
    assert draws() == expected


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "metrics.json"
    common.write_json(path, {"epoch": 1})

    def crash(tmp):
        tmp.write_text('{"epo')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        common.atomic_write(path, crash)
    assert json.loads(path.read_text()) == {"epoch": 1}


def test_write_json_round_trip(tmp_path):
    obj = {"fid": 12.5, "curves": {"loss": [3.0, 2.0]}, "n": 7}
    common.write_json(tmp_path / "sub" / "m.json", obj)
    assert json.loads((tmp_path / "sub" / "m.json").read_text()) == obj


def test_run_info_records_args_code_and_device():
    info = common.run_info(argparse.Namespace(seed=3, out="results/x"), torch.device("cpu"))
    assert info["args"] == {"seed": 3, "out": "results/x"}
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", info["git_commit"]), info["git_commit"]
    assert info["device"] == "cpu" and info["torch"] == torch.__version__
    assert info["threads"] == torch.get_num_threads()
    assert {"command", "started"} <= info.keys()
    json.dumps(info)


def test_check_finite():
    common.check_finite(torch.tensor(1.5), "epoch 1")
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(common.NonFiniteLossError, match="epoch 2 step 7"):
            common.check_finite(torch.tensor(bad), "epoch 2 step 7")


# ---------------------------------------------------------------- figures

def assert_png_and_pdf(stem):
    assert stem.with_suffix(".png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert stem.with_suffix(".pdf").read_bytes().startswith(b"%PDF")


def test_image_grid_layout():
    images = torch.arange(1, 6, dtype=torch.float32)[:, None, None, None].expand(5, 1, 3, 4) / 10
    grid = common.image_grid(images, nrow=3, padding=2, pad_value=1.0)
    assert grid.shape == (2 * (3 + 2) + 2, 3 * (4 + 2) + 2)
    expected = np.ones(grid.shape, dtype=np.float32)
    for i in range(5):
        r, c = divmod(i, 3)
        expected[2 + 5 * r:2 + 5 * r + 3, 2 + 6 * c:2 + 6 * c + 4] = (i + 1) / 10
    np.testing.assert_allclose(grid, expected)


def test_image_grid_accepts_three_dimensional_and_flat_input():
    images = torch.rand(3, 28, 28)
    grid = common.image_grid(images, nrow=2, padding=0)
    assert grid.shape == (56, 56)
    np.testing.assert_array_equal(grid[28:, :28], images[2].numpy())
    np.testing.assert_array_equal(common.image_grid(images.reshape(3, 784), nrow=2, padding=0), grid)


def test_save_image_grid_writes_png_and_pdf(tmp_path):
    stem = tmp_path / "figures" / "samples"
    common.save_image_grid(torch.rand(12, 1, 28, 28), stem, nrow=4, title="samples",
                           row_labels=["1 to 7", "2 to 3", "0 to 9"])
    assert_png_and_pdf(stem)
    common.save_image_grid(torch.rand(3, 28, 28), tmp_path / "plain", nrow=3)
    assert_png_and_pdf(tmp_path / "plain")


def test_save_curves_writes_png_and_pdf(tmp_path):
    stem = tmp_path / "curves"
    common.save_curves({"train": [3.0, 2.0, 1.5], "val": [3.1, 2.2, 1.9]}, stem, ylabel="bpd", title="t",
                       start=1)
    assert_png_and_pdf(stem)


# ---------------------------------------------------------------- speed

def test_stopwatch_accumulates_and_survives_state_round_trip(monkeypatch):
    clock = iter([10.0, 12.0, 20.0, 21.0, 30.0, 34.0])
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    watch = common.Stopwatch()
    assert watch.images_per_second == 0.0
    with watch:
        watch.count(100)
    with watch:
        watch.count(50)
    assert watch.seconds == 3.0 and watch.images == 150
    assert watch.images_per_second == 50.0

    resumed = common.Stopwatch(json.loads(json.dumps(watch.state())))
    assert (resumed.seconds, resumed.images) == (3.0, 150)
    with resumed:
        resumed.count(250)
    assert (resumed.seconds, resumed.images, resumed.images_per_second) == (7.0, 400, 400 / 7)
