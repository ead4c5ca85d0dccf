# Two commands matter: `make results` (train everything, write results/) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test lint results results-vae results-gan results-nf bench data

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

# Each run resumes from its last checkpoint if interrupted; rerunning a finished run only redraws
# its figures and metrics.
results-vae: $(STAMP)
	$(PY) a3_vae_template.py --resume --out results/vae --zdim 20
	$(PY) a3_vae_template.py --resume --out results/vae_z2 --zdim 2

results-gan: $(STAMP)
	$(PY) a3_gan_template.py --resume --out results/gan

results-nf: $(STAMP)
	$(PY) a3_nf_template.py --resume --out results/nf

results: results-vae results-gan results-nf

bench: $(STAMP)
	$(PY) benchmarks/loaders.py

include report/report.mk
