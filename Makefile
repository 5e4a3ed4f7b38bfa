# QLoRA recipe runner. `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RECIPE ?= recipes/tiny/xsum_tiny.yaml
# eval, compare, generate and export use the run's own recipe (its recipe.yaml) unless RECIPE is given.
RUN_RECIPE := $(if $(filter file,$(origin RECIPE)),,$(RECIPE))
RUN ?=
ARGS ?=
INPUT ?= -
# Processes (GPUs) for train/eval/compare: NPROC=N launches them through torchrun's own entry point (runner/cli/launch.py:
# its failure is one line after the runner's), one process without it.
NPROC ?= 1
LAUNCH := $(if $(filter-out 1,$(NPROC)),$(BIN)/python -m runner.cli.launch --nproc-per-node $(NPROC),$(BIN)/runner)
# CPU torch without a GPU (a small build; `pip install torch==2.13.0` finds the local CPU wheel where there is one),
# the CUDA build from PyPI with one. Override with `make install TORCH_SPEC=...`.
TORCH_SPEC ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo "torch>=2.6"; else echo "torch==2.13.0"; fi)
TINY := .cache/tiny/BUILT
# The CPU settings (OMP_*, TOKENIZERS_PARALLELISM, glibc's MALLOC_*) are the runner's own: `runner` sets them when
# it starts, wherever it is started (runner/common/cpu.py says why each, and how MALLOC_* reach glibc).
export HF_HUB_DISABLE_TELEMETRY ?= 1

.PHONY: help install validate inspect train eval compare generate export test test-fast smoke tiny lint clean plan bench sweep docs

help:  ## list the targets
	@echo "make install                    create .venv (CPU torch here, CUDA torch on a GPU machine) and install the runner (then source .venv/bin/activate puts runner on PATH)"
	@echo "make train [RECIPE=...] [ARGS=\"key=value ...\"]   train + evaluate + report.md (default: the tiny offline XSum twin; times: docs/timings.md)"
	@echo "make train RECIPE=... NPROC=N   the same on N GPUs (torchrun; also for eval and compare)"
	@echo "make eval RUN=runs/<name>/<time> [RECIPE=...]     re-evaluate a finished run's adapter (with the run's own recipe unless RECIPE is given)"
	@echo "make compare RUN=runs/<name>/<time> [RECIPE=...]  base model vs adapter on the same examples -> comparison.md"
	@echo "make sweep [RECIPE=...] AXES=\"lora.r=8,16 ...\" [SEEDS=N] [ARGS=...]   a grid of settings x seeds -> sweep.md/json/png"
	@echo "make generate RUN=runs/<name>/<time> [INPUT=file|-] [RECIPE=...]   completions for your own JSONL/text lines"
	@echo "make export RUN=runs/<name>/<time> OUT=dir [RECIPE=...]   merge the adapter into the dequantized base -> a plain transformers model folder"
	@echo "make validate RECIPE=...        check a recipe without loading anything heavy"
	@echo "make inspect [RECIPE=...]       token lengths, truncation, drops and labels per split -> inspect.json + histograms"
	@echo "make plan [RECIPE=...] [ARGS=\"training.vram_budget_gb=6\"]   parameters + predicted GPU memory per profile (config only)"
	@echo "make bench [VARIANTS=\"A fast ...\"]   the GPU benchmark (Phi-2-shaped QLoRA, generation; EVAL: evaluation old vs new), see bench/RESULTS.md"
	@echo "make test                       the whole test suite, what CI runs (CPU; docs/testing.md, times: docs/timings.md)"
	@echo "make test-fast                  the tests that neither train nor start torch, a fifth of the fuzz cases (docs/timings.md)"
	@echo "make smoke                      train every tiny recipe briefly through the CLI"
	@echo "make tiny                       build every tiny offline model (Phi and each family's twin) and the data in .cache/tiny (train builds what its recipe names)"
	@echo "make lint                       ruff"
	@echo "make docs                       regenerate docs/recipe-reference.md from the recipe schema"
	@echo "make clean                      remove runs/ and .cache/"

$(BIN)/runner: pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	@touch $(BIN)/runner

install: $(BIN)/runner  ## create the virtualenv and install

# The tiny data and the Phi twin, built once (runner.model.tiny stamps BUILT with its own source's hash).
$(TINY): $(BIN)/runner runner/model/tiny.py
	$(BIN)/python -m runner.model.tiny >&2
# The model-family twin a recipe's model names (recipes/tiny/llama_tiny.yaml: .cache/tiny/llama), built on first use;
# a recipe that names none (the default) builds nothing more.
TWIN = $(BIN)/python -m runner.model.twins --recipe $(RECIPE) $(ARGS) >&2

tiny: $(BIN)/runner  ## every twin: the Phi one and each model family's
	$(BIN)/python -m runner.model.twins >&2

validate: $(BIN)/runner
	$(BIN)/runner validate $(RECIPE) $(ARGS)

inspect: $(BIN)/runner $(TINY)
	@$(TWIN)
	$(BIN)/runner inspect $(RECIPE) $(ARGS)

train: $(BIN)/runner $(TINY)
	@$(TWIN)
	$(LAUNCH) train $(RECIPE) $(ARGS)

eval: $(BIN)/runner $(TINY)
	@test -n "$(RUN)" || { echo "error: RUN: missing (make eval RUN=runs/<name>/<time>)" >&2; exit 2; }
	$(LAUNCH) eval $(RUN_RECIPE) --run $(RUN) $(ARGS)

compare: $(BIN)/runner $(TINY)
	@test -n "$(RUN)" || { echo "error: RUN: missing (make compare RUN=runs/<name>/<time>)" >&2; exit 2; }
	$(LAUNCH) compare $(RUN_RECIPE) --run $(RUN) $(ARGS)

generate: $(BIN)/runner $(TINY)
	@test -n "$(RUN)" || { echo "error: RUN: missing (make generate RUN=runs/<name>/<time> INPUT=file)" >&2; exit 2; }
	$(BIN)/runner generate $(RUN_RECIPE) --run $(RUN) --input $(INPUT) $(ARGS)

OUT ?=
export: $(BIN)/runner $(TINY)
	@test -n "$(RUN)" -a -n "$(OUT)" || { echo "error: RUN, OUT: missing (make export RUN=runs/<name>/<time> OUT=merged/<name>)" >&2; exit 2; }
	$(BIN)/runner export $(RUN_RECIPE) --run $(RUN) --out $(OUT) $(ARGS)

AXES ?=
SEEDS ?= 1
sweep: $(BIN)/runner $(TINY)
	@test -n "$(AXES)$(filter-out 1,$(SEEDS))" || { echo "error: AXES: missing (make sweep AXES=\"lora.r=8,16\" SEEDS=2)" >&2; exit 2; }
	@$(TWIN)
	$(BIN)/runner sweep $(RECIPE) $(AXES) --seeds $(SEEDS) $(ARGS)

test: $(BIN)/runner $(TINY)  ## the whole suite (what CI runs)
	$(BIN)/python -m pytest -q tests

test-fast: $(BIN)/runner $(TINY)  ## everything but the tests that train (pytest -m "not slow"); a fifth of the fuzz cases
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-quick} $(BIN)/python -m pytest -q -m "not slow" tests

smoke: $(BIN)/runner $(TINY)
	$(BIN)/python -m runner.model.twins >&2  # every family's twin: smoke trains each tiny recipe
	for r in recipes/tiny/*.yaml; do case $$r in *_dpo_tiny.yaml) continue;; esac; \
	  $(BIN)/runner train $$r training.max_steps=5 output_dir=.cache/smoke-runs || exit 1; done
	# DPO starts from a trained adapter: the newest smoke run of the AG News twin
	$(BIN)/runner train recipes/tiny/agnews_dpo_tiny.yaml training.max_steps=5 output_dir=.cache/smoke-runs \
	  model.adapter=$$(ls -d $(CURDIR)/.cache/smoke-runs/agnews_tiny/*/ | tail -1)

lint: $(BIN)/runner
	$(BIN)/ruff check runner evaluators tests

docs: $(BIN)/runner  ## the recipe reference, generated from the schema (tests/test_docs.py checks it is current)
	$(BIN)/python -m runner.recipe.reference > docs/recipe-reference.md.partial
	mv docs/recipe-reference.md.partial docs/recipe-reference.md

clean:
	rm -rf runs .cache

plan: $(BIN)/runner $(TINY)  ## reads the model's config.json: the tiny one by default
	@$(TWIN)
	$(BIN)/runner plan $(RECIPE) $(ARGS)

VARIANTS ?= A L1 L2 L3 L4 low_memory balanced fast GEN fast_pack EVAL
bench: $(BIN)/runner  ## needs a GPU; without one, run `bash bench/run.sh` through the device tool (bench/RESULTS.md)
	PYTHON=$(BIN)/python bash bench/run.sh "$(VARIANTS)" $${BUDGET:-900}
