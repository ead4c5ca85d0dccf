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
# The same for a run of `make extensions` that may not be trained yet: without weights.pt, it says so.
rebuild_trained = if [ -f $(2)/weights.pt ]; then $(call rebuild,$(1),$(2),$(3)); \
	else echo "$(2): no weights.pt (make extensions trains it), not rebuilt"; fi

.PHONY: venv test lint results results-vae results-gan results-nf figures classifier bench data \
	tables extensions extensions-vae extensions-nf ablations

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
# with its checkpoint redraws it). The VAE extension runs and the multi-scale flows are rebuilt once
# trained with weights (runs from before their weights were committed are skipped, and say so).
figures: $(STAMP)
	$(call rebuild,a3_vae_template.py,results/vae)
	$(call rebuild,a3_vae_template.py,results/vae_z2,--zdim 2)
	$(call rebuild,a3_gan_template.py,results/gan)
	$(call rebuild,-m extensions.nf_couplings,results/extensions/nf_conv)
	$(call rebuild,-m extensions.nf_couplings,results/extensions/nf_conv_variational,$(NF_VARIATIONAL))
	$(call rebuild_trained,-m extensions.nf_multiscale,results/extensions/nf_multiscale)
	$(call rebuild_trained,-m extensions.nf_multiscale,results/extensions/nf_multiscale_variational,$(NF_VARIATIONAL))
	$(call rebuild_trained,$(VAE_FLOWS),results/extensions/vae_gaussian,$(GAUSSIAN))
	$(call rebuild_trained,$(VAE_FLOWS),results/extensions/vae_iaf_k4,$(IAF_K4))
	$(call rebuild_trained,$(VAE_FLOWS),results/extensions/vae_planar_k8,$(PLANAR_K8))
	$(call rebuild_trained,$(VAE_FLOWS),results/extensions/vae_iw5,$(IW5))
	$(call rebuild_trained,$(VAE_FLOWS),results/extensions/vae_iw5_dreg,$(IW5) --set iw_estimator=dreg)
	$(call rebuild_trained,$(VAE_FLOWS),results/extensions/vae_iw20,$(GAUSSIAN) --set iw_samples=20)
	$(call rebuild_trained,$(VAE_FLOWS),results/extensions/vae_gaussian_seed_1,$(GAUSSIAN) --seed 1)
	$(call rebuild_trained,$(VAE_FLOWS),results/extensions/vae_iaf_k4_seed_1,$(IAF_K4) --seed 1)
	$(call rebuild_trained,$(VAE_FLOWS),results/extensions/vae_planar_k8_seed_1,$(PLANAR_K8) --seed 1)
	$(call rebuild_trained,$(VAE_FLOWS),results/extensions/vae_iw5_seed_1,$(IW5) --seed 1)
	$(PY) -m report.tables

# The ablations, seed studies and sweeps of experiments.py, each into results/ablations/<name>/
# (resumable; `python experiments.py --list` shows them), then their table.
ablations: classifier
	$(PY) experiments.py
	$(PY) -m report.tables ablations

# Beyond the assignment, not part of `make results`. Then the tables and figures of results/extensions/.
extensions: extensions-nf extensions-vae
	$(PY) -m report.tables extensions

# The VAE with flow posteriors and with the importance-weighted bound (IWAE's and DReG's gradient),
# 80 epochs each, NLLs at the module's defaults (K = 500 on validation, 5,000 on test); a second seed
# of the Gaussian, planar, IAF and k = 5 runs. The flow lengths are chosen in experiments.py.
VAE_FLOWS = -m extensions.vae_flows
GAUSSIAN  = --set posterior=gaussian
PLANAR_K8 = --set posterior=planar --set flow_steps=8
IAF_K4    = --set posterior=iaf --set flow_steps=4
IW5       = $(GAUSSIAN) --set iw_samples=5
extensions-vae: classifier
	$(call train,$(VAE_FLOWS),results/extensions/vae_gaussian,$(GAUSSIAN))
	$(call train,$(VAE_FLOWS),results/extensions/vae_iaf_k4,$(IAF_K4))
	$(call train,$(VAE_FLOWS),results/extensions/vae_planar_k8,$(PLANAR_K8))
	$(call train,$(VAE_FLOWS),results/extensions/vae_iw5,$(IW5))
	$(call train,$(VAE_FLOWS),results/extensions/vae_iw5_dreg,$(IW5) --set iw_estimator=dreg)
	$(call train,$(VAE_FLOWS),results/extensions/vae_iw20,$(GAUSSIAN) --set iw_samples=20)
	$(call train,$(VAE_FLOWS),results/extensions/vae_gaussian_seed_1,$(GAUSSIAN) --seed 1)
	$(call train,$(VAE_FLOWS),results/extensions/vae_iaf_k4_seed_1,$(IAF_K4) --seed 1)
	$(call train,$(VAE_FLOWS),results/extensions/vae_planar_k8_seed_1,$(PLANAR_K8) --seed 1)
	$(call train,$(VAE_FLOWS),results/extensions/vae_iw5_seed_1,$(IW5) --seed 1)

# RealNVP with convolutional couplings and with the multi-scale architecture, each with uniform and
# with variational dequantization, 12 epochs each; the learning rates are chosen in experiments.py.
NF_VARIATIONAL = --set dequantization=variational
extensions-nf: classifier
	$(call train,-m extensions.nf_couplings,results/extensions/nf_conv)
	$(call train,-m extensions.nf_couplings,results/extensions/nf_conv_variational,$(NF_VARIATIONAL))
	$(call train,-m extensions.nf_multiscale,results/extensions/nf_multiscale)
	$(call train,-m extensions.nf_multiscale,results/extensions/nf_multiscale_variational,$(NF_VARIATIONAL))

# Loader and training speed, the template's way against ours, on this CPU (a few minutes): run it on
# an otherwise idle machine, e.g. not while `make results` trains.
bench: $(STAMP)
	$(PY) benchmarks/loaders.py
	$(PY) benchmarks/train_speed.py --out results

include report/report.mk
