# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# Rules call the `ood` entry point: put the venv first on PATH for Snakemake's jobs.
export PATH := $(BIN):$(PATH)

.PHONY: install demo test test-slurm lint report clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,slurm]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/snakemake results/tables/all.csv --profile profiles/local --configfile config/config.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

# A real one-node SLURM cluster (root; installs slurm-wlm and munge when missing):
# runs the demo through profiles/slurm and compares all.csv with `make demo`'s.
test-slurm: demo
	bash tests/slurm/test_slurm.sh

lint: $(STAMP)
	$(BIN)/ruff check ood tests benchmarks
	$(BIN)/ruff format --check ood tests benchmarks
	$(BIN)/snakefmt --check Snakefile workflow
	$(BIN)/snakemake --lint --configfile config/config.yaml

report: $(STAMP)
	$(BIN)/snakemake results/tables/all.csv --profile profiles/local --report results/report.html --configfile config/config.yaml

clean:
	rm -rf results resources .snakemake

# Scorer, workflow-overhead, training-, synthesis- and streaming-throughput benchmarks (benchmarks/README.md): `make bench QUICK=1` for a smoke run.
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py $(if $(QUICK),--quick)
	$(BIN)/python benchmarks/workflow_overhead.py $(if $(QUICK),--quick)
	$(BIN)/python benchmarks/train_throughput.py $(if $(QUICK),--quick)
	$(BIN)/python benchmarks/synthesis_throughput.py $(if $(QUICK),--quick)
	$(BIN)/python benchmarks/stream_throughput.py $(if $(QUICK),--quick)
