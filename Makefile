# Two entry points: `make demo` (main job) and `make test` (whole suite).
# Both create ./.venv with the pinned versions of constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench bench-tunix docs docs-serve clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,cli]"
	touch $(STAMP)

install: $(STAMP)

# The main job: a tour of a few minutes (PPO on CartPole, GRPO on a tiny LM and on
# a 2-D diffusion model) with progress bars, curves and checkpoints in runs/demo.
demo: $(STAMP)
	$(VENV)/bin/artifex-fn demo

# The documentation site (docs/, mkdocs.yml) into site/, in strict mode: a
# broken link or anchor, a missing page or an unparsable docstring fails.
# `make docs-serve` serves it at http://127.0.0.1:8000 and rebuilds on edits.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --strict

bench: $(STAMP)
	$(PY) benchmarks/bench_returns.py
	$(PY) benchmarks/bench_cartpole.py
	$(PY) benchmarks/bench_distributed.py
	$(PY) benchmarks/bench_algorithms.py
	$(PY) benchmarks/bench_trainers.py
	$(PY) benchmarks/bench_generation.py
	$(PY) benchmarks/bench_grpo_knobs.py --seeds 3
	$(PY) examples/arith_rlhf.py --plot benchmarks/results/arith_rlhf.png

# The generation benchmark with its tunix column (installs google-tunix and
# its dependencies into the same environment).
bench-tunix: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[bench-tunix]"
	$(PY) benchmarks/bench_generation.py

# One test worker per CPU (pytest-xdist; tests marked xdist_group share a
# worker); `make test PYTEST_ARGS=` runs serially.
PYTEST_ARGS ?= -n auto --dist loadgroup

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis site
