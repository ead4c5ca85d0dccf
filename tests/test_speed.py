"""Speed must not change results: each model's training steps done the project's way (the scripts'
fused optimizers, statistics accumulated on the device, inference_mode evaluation) against the
template's plain way, from the same seed on the same batches; the flow's bf16 matmuls are checked in
test_nf. Plus the benchmark harness's FLOP count and time-to-bar
reading against known answers, and a --quick smoke run of it on small fake data."""

import itertools
import json

import pytest
import torch
from conftest import N_FAKE_TRAIN

import a3_gan_template as gan
import a3_nf_template as nf
import a3_vae_template as vae
from benchmarks import loaders, train_speed


def fixed_batches(n, batch_size, low, high, seed=0, binary=False):
    """``n`` (images [B, 1, 28, 28], labels) batches, uniform in [low, high] (or 0/1 bits)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        images = torch.rand(batch_size, 1, 28, 28, generator=generator)
        images = torch.bernoulli(images, generator=generator) if binary else low + (high - low) * images
        batches.append((images, torch.zeros(batch_size, dtype=torch.int64)))
    return batches


def assert_same_parameters(ours, reference, atol, loose=(), loose_atol=None):
    """State dicts equal to ``atol``; the entries named in ``loose`` only to ``loose_atol``."""
    for (name, a), b in zip(ours.state_dict().items(), reference.state_dict().values(), strict=True):
        tolerance = loose_atol if name in loose else atol
        torch.testing.assert_close(a, b, rtol=0, atol=tolerance, msg=f"{name} differs")


def biases_before_batchnorm(sequential):
    """Names of the Linear biases that feed a BatchNorm: BN subtracts the batch mean, so their exact
    gradient is 0 and Adam, which normalises each gradient, moves them by up to lr per step in a
    direction set by rounding noise. Summing in another order changes that noise, nothing else."""
    layers = list(sequential)
    return {f"net.{i}.bias" for i, (layer, after) in enumerate(zip(layers[:-1], layers[1:], strict=True))
            if isinstance(layer, torch.nn.Linear) and isinstance(after, torch.nn.BatchNorm1d)}


# ---------------------------------------------------------------- speed keeps the results

def test_gan_fused_adam_and_device_statistics_match_the_template_loop():
    """Three steps of a3_gan_template.train with fused Adam, D frozen for G's step and one D pass over
    real and fake images give the parameters, BatchNorm statistics and mean losses of the template's
    loop with plain Adam, two D passes and .item() every batch."""
    batches = fixed_batches(3, 64, -1.0, 1.0)
    args = gan.parse_args([])
    runs = []
    for fused in (True, False):
        torch.manual_seed(0)
        generator, discriminator = gan.Generator(), gan.Discriminator()
        if fused:
            optimizers = gan.make_optimizers(generator, discriminator, args)
        else:
            optimizers = [torch.optim.Adam(m.parameters(), lr=args.lr, betas=(0.5, 0.999))
                          for m in (generator, discriminator)]
        torch.manual_seed(1)  # the same z in both runs
        if fused:
            stats = gan.train(batches, discriminator, generator, *optimizers)
            losses = (stats["loss_d"], stats["loss_g"])
        else:
            per_batch = train_speed.template_gan_steps(generator, discriminator, *optimizers, batches)
            losses = tuple(sum(column) / len(column) for column in zip(*per_batch, strict=True))
        runs.append((generator, discriminator, losses))
    (g_ours, d_ours, losses_ours), (g_ref, d_ref, losses_ref) = runs
    assert_same_parameters(g_ours, g_ref, atol=1e-5, loose=biases_before_batchnorm(g_ours.net),
                           loose_atol=len(batches) * args.lr)
    assert_same_parameters(d_ours, d_ref, atol=1e-5)
    assert losses_ours == pytest.approx(losses_ref, rel=1e-5)
    # The steps did train: the parameters moved away from the shared initialisation.
    torch.manual_seed(0)
    untrained = gan.Generator()
    assert not torch.allclose(g_ours.net[0].weight, untrained.net[0].weight, atol=1e-5)


def test_vae_training_and_inference_mode_evaluation_match_the_plain_way():
    """Three steps of a3_vae_template.epoch_iter with its fused Adam equal the template's loop with
    .item() every batch; its evaluation under inference_mode equals the plain mean of model(x) under
    no_grad."""
    batches = fixed_batches(3, 32, 0.0, 1.0, binary=True)
    models, losses = [], []
    for ours in (True, False):
        torch.manual_seed(0)
        model = vae.VAE(hidden_dim=64, z_dim=4)
        optimizer = (vae.make_optimizer(model, vae.parse_args(["--lr", "1e-3"])) if ours
                     else torch.optim.Adam(model.parameters(), lr=1e-3))
        torch.manual_seed(1)  # the same reparameterisation noise in both runs
        if ours:
            losses.append(vae.epoch_iter(model.train(), [images for images, _ in batches], optimizer))
        else:
            per_batch = train_speed.template_vae_steps(model, optimizer, batches)
            losses.append(sum(per_batch) / len(per_batch))
        models.append(model)
    assert_same_parameters(*models, atol=1e-6)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)

    model = models[0].eval()
    torch.manual_seed(2)
    evaluated = vae.epoch_iter(model, [images for images, _ in batches], None)
    torch.manual_seed(2)
    with torch.no_grad():
        reference = sum(model(images).item() for images, _ in batches) / len(batches)
    assert evaluated == pytest.approx(reference, rel=1e-6)


def test_nf_training_and_evaluation_match_the_plain_way():
    """Two steps of a3_nf_template.epoch_iter (its fused AdamW without weight decay, bits/dim summed on the
    device) equal the template's loop (Adam, .item() every batch); its evaluation equals the mean of
    per-batch bits/dim under inference_mode with the same fixed dequantization noise. Clipping is a
    training choice, not a speed-up, so it is left out here."""
    # Pixel values 0..255 as floats, flattened, as datasets.mnist and the template's loader give them.
    batches = [(images.floor().reshape(16, nf.N_PIXELS), labels)
               for images, labels in fixed_batches(2, 16, 0.0, 255.99)]
    models, losses = [], []
    for ours in (True, False):
        torch.manual_seed(0)
        model = nf.Model([nf.N_PIXELS])
        torch.manual_seed(1)
        if ours:
            optimizer = nf.make_optimizer(model, nf.parse_args(["--lr", "5e-4", "--weight-decay", "0"]))
            losses.append(nf.epoch_iter(model.train(), batches, optimizer))
        else:
            optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
            per_batch = train_speed.template_nf_steps(model, optimizer, batches)
            losses.append(sum(per_batch) / len(per_batch))
        models.append(model)
    assert_same_parameters(*models, atol=1e-5)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)

    model = models[0].eval()
    evaluated = nf.epoch_iter(model, batches, None)
    noise = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        reference = [nf.bits_per_dim(model(images, generator=noise)).mean().item() for images, _ in batches]
    assert evaluated == pytest.approx(sum(reference) / len(reference), rel=1e-6)


# ---------------------------------------------------------------- the harness's pieces

def test_linear_flops_count_forward_weight_and_input_gradients():
    """Linear(3, 4) -> Linear(4, 2) on 5 rows: forward 2*5*(12 + 8) = 200 FLOPs. Backward: both weight
    gradients (200), plus the input gradient of the second layer only (2*5*8 = 80), since the data
    needs none: 480. With an input that needs a gradient, 3x the forward: 600. Under no_grad: 200."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    data = torch.randn(5, 3)
    assert train_speed.count_linear_flops([model], lambda: model(data).sum().backward()) == 480
    leaf = data.clone().requires_grad_()
    assert train_speed.count_linear_flops([model], lambda: model(leaf).sum().backward()) == 600
    with torch.no_grad():
        assert train_speed.count_linear_flops([model], lambda: model(data)) == 200
    assert not model[0]._forward_hooks, "the counting hooks must be removed"


def test_matmul_measurements_merge_into_the_best_repetition_of_all():
    early = {"size": 8, "reps": 3, "dtype": "float32", "gflops": [10.0, 30.0, 20.0]}
    late = {"size": 8, "reps": 2, "dtype": "float32", "gflops": [50.0, 40.0]}
    for measurement in (early, late):
        measurement["gflops_best"] = max(measurement["gflops"])
    merged = train_speed.merge_matmul([early, late])
    assert (merged["reps"], merged["measurements"], merged["gflops_best"]) == (5, 2, 50.0)
    assert merged["gflops_median"] == 30.0 and merged["gflops_best_per_measurement"] == [30.0, 50.0]


def write_metrics(results, run, metrics):
    (results / run).mkdir(parents=True)
    (results / run / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def fake_results(tmp_path):
    """VAE below 100 nats at epoch 2 (20.5 s); flow never below 1.85 (best 1.86); GAN >= 9 first at
    epoch 10 (600 s), with its progress list out of order; no z = 2 VAE run."""
    results = tmp_path / "results"
    write_metrics(results, "vae", {"wall_time_s": 31.0, "curves": {
        "val_negative_elbo": [540.0, 120.0, 99.5, 95.0], "wall_time_s": [0.0, 10.0, 20.5, 31.0]}})
    write_metrics(results, "nf", {"wall_time_s": 300.0, "curves": {
        "val_bpd": [2.0, 1.9, 1.86], "wall_time_s": [100.0, 200.0, 300.0]}})
    write_metrics(results, "gan", {
        "wall_time_s": 600.0, "curves": {"wall_time_s": [60.0 * e for e in range(1, 11)]},
        "progress": [{"epoch": 5, "score": 8.5}, {"epoch": 10, "score": 9.2}, {"epoch": 1, "score": 3.0}]})
    return results


def test_quality_bars_read_from_the_runs_metrics(fake_results, tmp_path):
    rows = {row["model"]: row for row in train_speed.quality_bars(fake_results)}
    assert (rows["VAE"]["status"], rows["VAE"]["epoch"], rows["VAE"]["seconds"]) == ("reached", 2, 20.5)
    assert (rows["flow"]["status"], rows["flow"]["best"]) == ("not reached", 1.86)
    assert rows["flow"]["seconds"] is None
    assert (rows["GAN"]["status"], rows["GAN"]["epoch"], rows["GAN"]["seconds"]) == ("reached", 10, 600.0)
    assert rows["GAN"]["best"] == 9.2
    assert {row["status"] for row in train_speed.quality_bars(tmp_path / "nothing")} == {"no run"}
    seconds = train_speed.training_seconds(fake_results)
    assert seconds == {"vae": 31.0, "vae_z2": None, "gan": 600.0, "nf": 300.0}


def test_quick_run_writes_the_report(fake_mnist_root, fake_results, tmp_path, monkeypatch):
    """The whole harness with a handful of steps on fake MNIST: both ways of every model run and the
    report holds consistent numbers."""
    # The template's flow loader takes the first 40,000 images; the fake set has fewer.
    monkeypatch.setattr(loaders, "N_TRAIN", 100)
    out = tmp_path / "bench"
    train_speed.main(["--quick", "--data-root", str(fake_mnist_root), "--out", str(out),
                      "--results", str(fake_results)])
    report = json.loads((out / "benchmark.json").read_text())
    text = (out / "benchmark.md").read_text()
    assert set(report["models"]) == {"vae", "gan", "nf"}
    # By hand, in multiply-adds per image, x3 for forward and both gradients and x2 for first layers fed
    # data or noise, then 2 FLOPs each. VAE: 784*500 (x2), 500*500 + 500*40 and the decoder's
    # 20*500 + 500*500 + 500*784 (x3). GAN: G's 100*128 (x2) and 128*256 + 256*512 + 512*1024 + 1024*784
    # (x3); D = 784*512 + 512*256 + 256*1 on fakes for G's step (x3), on detached fakes and real images
    # (784*512 x2, the rest x3). Flow: 8 couplings of 784*1024 + 1024*1024 + 1024*1568 (x3), but
    # the first coupling's first layer sees only data (x2).
    d_first, d_rest = 784 * 512, 512 * 256 + 256
    coupling = 784 * 1024 + 1024 * 1024 + 1024 * 1568
    expected_flops = {
        "vae": 2 * (784 * 500 * 2 + (500 * 500 + 500 * 40 + 20 * 500 + 500 * 500 + 500 * 784) * 3),
        "gan": 2 * (100 * 128 * 2 + (128 * 256 + 256 * 512 + 512 * 1024 + 1024 * 784) * 3
                    + (d_first + d_rest) * 3 + 2 * (d_first * 2 + d_rest * 3)),
        "nf": 2 * (8 * coupling * 3 - 784 * 1024),
    }
    for key, row in report["models"].items():
        assert row["speedup"] == pytest.approx(row["ours"]["images_per_s"] / row["template"]["images_per_s"])
        ours = expected_flops[key]
        if key == "gan":  # D frozen for G's step: no weight gradients there (x2, not x3). The first of the
            # counted steps carries the R1 penalty, which gives its batch an input gradient in D's first
            # layer, over the real and fake rows that D scores in one pass. The loader keeps the last,
            # short batch of each epoch over the fake training images.
            batch_size = gan.parse_args([]).batch_size
            epoch = [min(batch_size, N_FAKE_TRAIN - start) for start in range(0, N_FAKE_TRAIN, batch_size)]
            counted = list(itertools.islice(itertools.cycle(epoch), train_speed.FLOP_COUNT_STEPS))
            ours += 2 * (-(d_first + d_rest) + d_first * 2 * counted[0] / sum(counted))
        assert row["ours"]["linear_flops_per_image"] == pytest.approx(ours)
        assert row["template"]["linear_flops_per_image"] == expected_flops[key]
        assert row["ours"]["batch_size"] == {"vae": 128, "gan": 128, "nf": 256}[key]
        for way in ("template", "ours"):  # the median of the alternating rounds (the lower one of two)
            rounds = row[way]["rounds_images_per_s"]
            assert len(rounds) == train_speed.QUICK_ROUNDS == 2
            assert row[way]["images_per_s"] == min(rounds)
        assert row["name"] in text
    assert report["matmul"]["gflops_best"] >= report["matmul"]["gflops_median"] > 0
    assert report["matmul"]["measurements"] == len(train_speed.MODELS) + 1  # before each model, at the end
    assert report["matmul"]["gflops_best"] == max(report["matmul"]["gflops_best_per_measurement"])
    best = report["matmul"]["gflops_best"]
    for row in report["models"].values():  # the fraction is of the machine's best GEMM rate
        assert row["ours"]["matmul_fraction"] == pytest.approx(row["ours"]["gflops"] / best)
    assert report["machine"]["torch"] == torch.__version__
    assert report["machine"]["torch_threads"] == 1
    assert "0.3 min (epoch 2)" in text and "not reached (best 1.86)" in text
    goals = {goal["goal"].split(" ")[0]: goal for goal in report["goals"]}
    assert goals["make"]["met"] is None  # the z = 2 VAE has no run
