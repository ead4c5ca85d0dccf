"""Evaluate a trained model from its checkpoint, or check or retrain the yardstick's classifier.

    python -m evaluation --model gan --checkpoint results/gan/checkpoint.pt
    python -m evaluation --classifier
    python -m evaluation --train-classifier

The first draws samples through the script's ``load_sampler``, scores them with
``evaluate_samples``, prints one line and writes evaluation.json (and the memorisation figure)
beside the checkpoint; the tables (``python -m report.tables``) prefer it to the run's own
evaluation when it is newer. The second checks the committed digit classifier behind the measures
and prints its test accuracy and SHA-256. The third trains a new one in its place (a few minutes):
a new yardstick, after which every run must be scored again. The tables of these numbers are the
report's: ``python -m report.tables``.

To evaluate another model here: its script a3_<name>_template.py provides
``load_sampler(checkpoint_path, device)`` (a function n -> n images in [0, 1]) and <name> joins MODELS.
A new measure belongs in ``evaluation.evaluate_samples`` (the row it returns) and in ``summary``.
"""

import argparse
import importlib
import time
from pathlib import Path

import torch

from evaluation import evaluate_samples
from evaluation.classifier import load_classifier, save_classifier
from harness import cli, get_device, positive_int, seed_everything
from harness.files import write_json
from harness.run import DEFAULT_DATA_ROOT

MODELS = ("vae", "gan", "nf")  # a3_<model>_template.py, each with its load_sampler


def summary(name, evaluation):
    memorised = evaluation["memorisation"]
    return (f"{name}: FID {evaluation['fid']:.2f} | precision {evaluation['precision']:.3f} | recall "
            f"{evaluation['recall']:.3f} | memorised {100 * memorised['pixel']['share']:.2f}% (pixels), "
            f"{100 * memorised['feature']['share']:.2f}% (features) | score {evaluation['score']:.2f} | "
            f"class KL {evaluation['class_kl_uniform']:.4f} | Parzen LL {evaluation['parzen_ll']:.1f} "
            f"± {evaluation['parzen_se']:.1f} (sigma {evaluation['parzen_sigma']:.3f}) | "
            f"{evaluation['n_samples']} samples")


def evaluate_checkpoint(model, checkpoint, n_samples, root, device):
    sampler = importlib.import_module(f"a3_{model}_template").load_sampler(checkpoint, device)
    start = time.perf_counter()
    with torch.no_grad():
        images = sampler(n_samples)
    sampled = time.perf_counter()
    evaluation = evaluate_samples(images, root, device, out=Path(checkpoint).parent)
    timing = {"sampling_s": sampled - start, "scoring_s": time.perf_counter() - sampled}
    write_json(Path(checkpoint).with_name("evaluation.json"),
               {**evaluation, "model": model, "checkpoint": str(checkpoint), **timing})
    print(summary(model, evaluation) + f" | sampled in {timing['sampling_s']:.0f} s, "
          f"scored in {timing['scoring_s']:.0f} s")
    return evaluation


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--model", choices=MODELS, help="which script's load_sampler to use")
    action.add_argument("--classifier", action="store_true",
                        help="check the committed digit classifier and print its test accuracy")
    action.add_argument("--train-classifier", action="store_true",
                        help="train a new digit classifier in place of the committed one")
    parser.add_argument("--checkpoint", help="checkpoint of the model to evaluate (with --model)")
    parser.add_argument("--n-samples", type=positive_int, default=10_000)
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--seed", type=int, default=0, help="seed for drawing the samples")
    args = parser.parse_args(argv)
    device = get_device(args.device)

    if args.classifier:
        classifier = load_classifier(device)
        print(f"digit classifier (SHA-256 {classifier.sha256}): test accuracy {classifier.test_accuracy:.2%}")
        return
    if args.train_classifier:
        save_classifier(root=args.data_root, device=device)
        return
    if args.checkpoint is None:
        parser.error("--model needs --checkpoint")
    seed_everything(args.seed)
    evaluate_checkpoint(args.model, args.checkpoint, args.n_samples, args.data_root, device)


if __name__ == "__main__":
    cli(main)
