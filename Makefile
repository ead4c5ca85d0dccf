# Two commands matter: `make results` (train everything, write results/) and `make test`;
# `make figures` rebuilds the figures and measures from the committed weights in minutes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Run (or resume) a training script; each script keeps its own <out>/train.log.
train = $(PY) $(1) --resume --out $(2) $(3)

.PHONY: venv test lint results results-vae results-gan results-nf figures classifier bench data \
	extensions extensions-vae extensions-nf

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

# Each run resumes from its last checkpoint if interrupted; rerunning a finished run only redraws
# its figures and metrics.
results-vae: classifier
	$(call train,a3_vae_template.py,results/vae,--zdim 20)
	$(call train,a3_vae_template.py,results/vae_z2,--zdim 2)

results-gan: classifier
	$(call train,a3_gan_template.py,results/gan)

results-nf: classifier
	$(call train,a3_nf_template.py,results/nf)

results: results-vae results-gan results-nf
	$(PY) -m evaluation --table

# Every sample figure, evaluation row and the comparison table again from the committed weights
# (results/*/weights.pt), training nothing; the MLP flow's weights are too large to commit, so its
# row stays as its run wrote it (`make results-nf` with its checkpoint redraws it).
figures: $(STAMP)
	$(PY) a3_vae_template.py --from_weights --out results/vae --zdim 20
	$(PY) a3_vae_template.py --from_weights --out results/vae_z2 --zdim 2
	$(PY) a3_gan_template.py --from_weights --out results/gan
	$(PY) a3_nf_template.py --from_weights --out results/extensions/nf_conv --coupling conv --epochs 12
	$(PY) a3_nf_template.py --from_weights --out results/extensions/nf_conv_variational --coupling conv \
		--dequantization variational --epochs 12
	$(PY) -m evaluation --table

# Beyond the assignment, not part of `make results`: each run trains in at most ~25 min on a 2-core
# CPU. Then the tables and figures of results/extensions/ (python -m evaluation.extensions).
extensions: extensions-nf extensions-vae
	$(PY) -m evaluation.extensions

# VAE with flow posteriors, all 80 epochs, every NLL estimated with the same K = 1000 importance
# samples.
VAE_EXT = --epochs 80 --importance_samples 1000
extensions-vae: classifier
	$(call train,a3_vae_template.py,results/extensions/vae_gaussian,$(VAE_EXT))
	$(call train,a3_vae_template.py,results/extensions/vae_iaf_k4,$(VAE_EXT) --posterior iaf --flow_steps 4)
	$(call train,a3_vae_template.py,results/extensions/vae_planar_k8,$(VAE_EXT) --posterior planar --flow_steps 8)

# RealNVP with convolutional couplings, uniform and variational dequantization, 12 epochs each.
extensions-nf: classifier
	$(call train,a3_nf_template.py,results/extensions/nf_conv,--coupling conv --epochs 12)
	$(call train,a3_nf_template.py,results/extensions/nf_conv_variational,--coupling conv --dequantization variational --epochs 12)

# Loader and training speed, the template's way against ours, on this CPU (a few minutes): run it on
# an otherwise idle machine, e.g. not while `make results` trains.
bench: $(STAMP)
	$(PY) benchmarks/loaders.py
	$(PY) benchmarks/train_speed.py --out results

include report/report.mk
