# Two commands matter: `make results` (train everything, write results/) and `make test`;
# `make figures` rebuilds the figures and measures from the committed weights in minutes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Run (or resume) a training script or extension module; each run keeps its own <out>/train.log.
train = $(PY) $(1) --resume --out $(2) $(3)
# Rebuild a finished run's figures and measures from its committed weights, training nothing.
rebuild = $(PY) $(1) --from_weights --out $(2) $(3)

.PHONY: venv test lint results results-vae results-gan results-nf figures classifier bench data \
	tables extensions ablations

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q tests

data: $(STAMP)
	$(PY) -c "from datasets.raw import ensure_mnist; print(ensure_mnist('./data/'))"

# Checks the committed digit classifier behind FID, score, precision and recall and the interpolation
# labels (evaluation/digit_classifier.pt, against its SHA-256) and prints its test accuracy.
classifier: $(STAMP)
	$(PY) -m evaluation --classifier

# The comparison, ablation and extension tables and figures, from every results/**/metrics.json.
tables: $(STAMP)
	$(PY) -m report.tables

# Each run resumes from its last checkpoint if interrupted; rerunning a finished run only redraws
# its figures and metrics.
results-vae: classifier
	$(call train,a3_vae_template.py,results/vae)
	$(call train,a3_vae_template.py,results/vae_z2,--zdim 2)

results-gan: classifier
	$(call train,a3_gan_template.py,results/gan)

results-nf: classifier
	$(call train,a3_nf_template.py,results/nf)

results: results-vae results-gan results-nf
	$(PY) -m report.tables comparison

# Every sample figure, evaluation row and table again from the committed weights
# (results/**/weights.pt), training nothing; a file whose numbers are unchanged is not rewritten. The
# MLP flow's weights are too large to commit, so its row stays as its run wrote it (`make results-nf`
# with its checkpoint redraws it). The runs of `make extensions` are redrawn where trained, with
# weights (experiments.py names the others).
figures: $(STAMP)
	$(call rebuild,a3_vae_template.py,results/vae)
	$(call rebuild,a3_vae_template.py,results/vae_z2,--zdim 2)
	$(call rebuild,a3_gan_template.py,results/gan)
	$(PY) experiments.py --suite extensions --from_weights
	$(PY) -m report.tables

# The ablations, seed studies and sweeps of experiments.py, each into results/ablations/<name>/
# (resumable; `python experiments.py --list` shows them), then their table.
ablations: classifier
	$(PY) experiments.py --suite ablations
	$(PY) -m report.tables ablations

# Beyond the assignment, not part of `make results`: the entries of experiments.py's suite
# "extensions" (the VAE with flow posteriors and the importance-weighted bound, the convolutional and
# multi-scale flows, and the selection of their settings on validation), then the tables and figures
# of results/extensions/.
extensions: classifier
	$(PY) experiments.py --suite extensions
	$(PY) -m report.tables extensions ablations

# Loader and training speed, the template's way against ours, on this CPU (a few minutes): run it on
# an otherwise idle machine, e.g. not while `make results` trains.
bench: $(STAMP)
	$(PY) benchmarks/loaders.py
	$(PY) benchmarks/train_speed.py --out results

include report/report.mk
