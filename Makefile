# Two commands: `make train` (the embedded tiny default on CPU) and `make test`.
# Both bootstrap .venv idempotently (re-installing only when pyproject.toml changes) and install the system
# packages they need (tesseract-ocr for the OCR reward) through apt when run as root.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.glm_jax-installed
APT_PKGS := tesseract-ocr fonts-dejavu-core

.PHONY: train test venv sysdeps lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "glm_jax needs Python 3.11+"' || \
	  { echo "error: $(PYTHON) is older than 3.11; run 'make PYTHON=python3.11 ...'"; exit 1; }
	@if [ ! -x $(PY) ]; then \
	  $(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      rm -rf $(VENV); apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv \
	      && $(PYTHON) -m venv $(VENV); \
	    else echo "error: '$(PYTHON) -m venv' failed; install python3-venv (sudo apt-get install python3-venv)"; \
	      exit 1; fi; }; fi
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first, pinned, so that nothing resolves a CUDA build; torch is a test dependency only.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

sysdeps:
	@missing=""; command -v tesseract >/dev/null || missing="tesseract-ocr"; \
	  [ -d /usr/share/fonts/truetype/dejavu ] || missing="$$missing fonts-dejavu-core"; \
	  if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      echo "installing $$missing"; apt-get update -qq && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	    else echo "error: missing system packages:$$missing; install them with: sudo apt-get install$$missing"; \
	      exit 1; fi; fi

# GRPO on the embedded default: the tiny random GLM-Image and the sample T2I data, on CPU (about two minutes);
# the DiT's reward rises. runs/tiny starts afresh each time (the CLI itself resumes an existing workdir).
train: venv sysdeps
	rm -rf runs/tiny
	$(PY) -m glm_jax.train --config configs/t2i.py:tiny --workdir runs/tiny

test: venv sysdeps
	$(PY) -m pytest -n 2 --dist loadfile --durations=25 tests

lint: venv
	$(VENV)/bin/ruff check glm_jax conversion configs tests benchmarks

clean:
	rm -rf runs .pytest_cache
