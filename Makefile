# Set-up, demo and tests. `make demo`, `make test` and `make test-all` each create .venv and install first.
VENV ?= .venv
PYTHON ?= python3
# PyTorch is installed first so its build matches torchvision; override for your platform,
# e.g. `make setup TORCH="torch torchvision --index-url https://download.pytorch.org/whl/cu128"`.
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN = $(VENV)/bin

.PHONY: setup demo test test-all lint bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	@echo "compiling UMAP's numba kernels into the cache once, so no 'metriclab compare' needs to"
	$(BIN)/python -c "from metriclab.viz.projections import compile_umap; compile_umap()"
	$(BIN)/python -m metriclab.metrics.kernels
	touch $@

demo: setup
	run=runs/demo-$$(date +%Y%m%d-%H%M%S) && \
	$(BIN)/accelerate launch --num_processes 1 recipes/mnist_siamese.py --output-dir $$run && \
	$(BIN)/metriclab evaluate $$run

# The default suite leaves out the long end-to-end runs (marked slow); test-all, which CI runs, has them too.
test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

bench: setup
	$(BIN)/python bench/run.py
