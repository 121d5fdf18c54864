# `make demo` and `make test` set everything up on a fresh Debian machine, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DATA   := datasets/fashion-mnist
FMNIST := /usr/share/datasets/fashion-mnist
# GPU nodes take faiss's GPU build; everything else its CPU build
FAISS  := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)

DEVICE ?= cuda
# pytest-xdist workers: the suite's stage processes run one thread each, so two workers keep 2 cores busy
TEST_WORKERS ?= 2

.PHONY: setup demo test bench data clean gpu-smoke compare variants gpu-bundle paper-dry-run

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[$(FAISS),dali,dev,track]'
	touch $@

$(FMNIST):
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

data: setup $(FMNIST)
	$(BIN)/python launch/prepare.py fashion-mnist --out $(DATA) --labels-per-class 30 --val-size 5000 --seed 0

demo: data
	$(BIN)/python launch/pipeline.py --config configs/demo/pipeline.yaml data.root=$(DATA)

test: setup $(FMNIST) gpu-bundle
	sh tests/slurm_harness/install.sh
	sh tests/chromium_install.sh
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) tests

# No network: runs with the python on PATH and this checkout on PYTHONPATH (torch, torchvision, numpy, pillow); what
# else it needs (pyyaml, tqdm, submitit, faiss-cpu) and that python lacks, it installs offline from gpu-bundle/ (make
# gpu-bundle) into a temporary folder; DALI, faiss, submitit and apex steps say SKIP when missing. DEVICE=cpu: the CPU twin.
gpu-smoke:
	PYTHONPATH=$(CURDIR) $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) tests/gpu_smoke.py --device $(DEVICE)

# The paper's configs at their shapes (ResNet-50, 8192-d projector, 800 classes, 96/144/192 px) on a generated pile,
# two steps a stage: every stage accepts them, and each step's peak memory (runs/paper-dry-run/dry_run.json)
paper-dry-run: setup
	$(BIN)/python launch/dry_run.py --config configs/paper/pipeline.yaml --classes 800 --out runs/paper-dry-run

bench: setup
	$(BIN)/python launch/bench.py --json runs/bench.json

clean:
	rm -rf runs

# make demo, then FixMatch from random init on the same labels for the recipe's minutes, scored against it in
# runs/demo/report.md (the same run dir: the recipe's finished steps are kept)
compare: data
	$(BIN)/python launch/pipeline.py --config configs/demo/pipeline.yaml data.root=$(DATA) "pipeline.baselines=[fixmatch_only]"

# data shaped unlike the demo, next to it (data.prepare.pool_variants): 10 labels per class, a long-tailed
# unlabeled pool, 2 classes outside the class list making 20% of the pool, a pool of 5000 images
PREPARE_FMNIST := $(BIN)/python launch/prepare.py fashion-mnist --val-size 5000 --seed 0
variants: setup $(FMNIST)
	$(PREPARE_FMNIST) --out datasets/fmnist-10pc --labels-per-class 10
	$(PREPARE_FMNIST) --out datasets/fmnist-longtail --labels-per-class 30 --long-tail 10
	$(PREPARE_FMNIST) --out datasets/fmnist-openset --labels-per-class 30 --open-set-classes 2 --open-set-fraction 0.2
	$(PREPARE_FMNIST) --out datasets/fmnist-5k --labels-per-class 30 --unlabeled-size 5000

# The wheels that tests/gpu_smoke.py installs offline, where the Python running it lacks them (a GPU machine has no
# network): downloaded here into gpu-bundle/ (git-ignored; carry it to the GPU machine with the checkout). The list,
# the GPU machines' Python version and the 60 MiB cap are the smoke's; it prints the size.
gpu-bundle: setup
	$(BIN)/python tests/gpu_smoke.py --make-bundle gpu-bundle
