# meshlib's entry points: the same commands locally and in CI.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: test lint typecheck unit compiled unit-compiled bench demo clean debian-packages

# Create the virtual environment and install meshlib with its test and demo extras when
# missing or when pyproject.toml changed.
$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "meshlib needs Python >= 3.10")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,demo]'
	@touch $@

# The compiled build (a single-threaded C compile, ~2 min) runs beside the pure suite, which
# mostly waits on its servers; the compiled modules' tests run once both are done.
test: lint typecheck
	@$(MAKE) --no-print-directory -j2 unit compiled
	@$(MAKE) --no-print-directory unit-compiled COMPILED_READY=1

lint: $(BIN)/.installed
	$(BIN)/ruff check meshlib tests bench examples
	$(BIN)/ruff format --check meshlib tests bench examples

typecheck: $(BIN)/.installed
	$(BIN)/mypy

# The suite spends most of its time waiting on the servers it starts (one core stays mostly
# idle), so `make` runs it on TEST_WORKERS processes, a test file to each at a time (module
# fixtures are started once); TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
PYTEST_WORKERS := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
unit: $(BIN)/.installed debian-packages
	$(BIN)/pytest $(PYTEST_WORKERS)

# The compiled build (README.md): mypyc compiles the per-request modules listed in
# pyproject.toml into a wheel in dist/. It builds in a copy of the tree, build/compiled: the
# build leaves C extensions beside the sources it compiled, and in the working tree they would
# shadow every later edit of those sources. The copy then holds the compiled package, and
# `unit-compiled` runs the tests there against it.
COMPILED := build/compiled
# Only `compiled` turns the hook on: an editable install built with it would compile in place.
unexport HATCH_BUILD_HOOK_ENABLE_MYPYC
compiled: $(BIN)/.installed
	@command -v cc >/dev/null || { echo "make: the compiled build needs a C compiler (apt-get install gcc)" >&2; exit 1; }
	rm -rf $(COMPILED) dist/meshlib_istio-*.whl
	$(BIN)/python -c 'import shutil, sys; shutil.copytree(".", sys.argv[1], ignore=shutil.ignore_patterns(*sys.argv[2:]))' \
	  $(COMPILED) build dist .git .demo "$(notdir $(VENV))" __pycache__ "*_cache" .hypothesis "*.so"
	@echo "make: compiling with mypyc (two to three minutes)"
	cd $(COMPILED) && HATCH_BUILD_HOOK_ENABLE_MYPYC=1 \
	  "$(abspath $(BIN))/python" -m pip wheel --quiet --no-deps -w "$(CURDIR)/dist" .
	$(BIN)/python -m zipfile -e dist/meshlib_istio-*.whl $(COMPILED)

# `python -m pytest` from the copy: its compiled meshlib comes first on sys.path
# (MESHLIB_COMPILED makes tests/conftest.py check that it did). `make test` runs the tests of
# the compiled modules; COMPILED_TESTS=tests runs the whole suite on the compiled build.
COMPILED_TESTS ?= tests/telemetry tests/dataplane tests/clients tests/test_inbound.py \
  tests/test_inbound_edges.py tests/test_inbound_failures.py tests/test_inbound_servers.py \
  tests/test_wsgi_served.py tests/e2e/test_span_routes.py tests/e2e/test_django_routes.py \
  tests/test_memo.py \
  tests/test_docs.py tests/e2e/test_requests_client.py
unit-compiled: $(if $(COMPILED_READY),,compiled) debian-packages
	cd $(COMPILED) && MESHLIB_COMPILED=1 \
	  "$(abspath $(BIN))/python" -m pytest -p no:cacheprovider $(PYTEST_WORKERS) $(COMPILED_TESTS)

# Debian packages the tests use: `prometheus` (tests/e2e/test_prometheus.py runs the binary on
# loopback). Installed with apt-get when missing; without root or apt-get the install is skipped
# with a message and the tests that need it skip, naming the package. Only the binary is used:
# where systemd runs, the service the package enables is stopped and disabled again.
debian-packages:
	@if command -v prometheus >/dev/null 2>&1; then \
	  :; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make: Debian package prometheus is missing and cannot be installed here (needs root and apt-get); its tests will skip" >&2; \
	else \
	  echo "make: installing Debian package prometheus (apt-get)"; \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null && \
	  if [ -d /run/systemd/system ]; then systemctl disable --now prometheus.service >/dev/null 2>&1 || true; fi && \
	  prometheus --version 2>&1 | head -n 1; \
	fi

# The benchmarks' own extra (stock OpenTelemetry middleware, OTLP encoding) on top of the rest.
$(BIN)/.installed-bench: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test,demo,bench]'
	@touch $@

bench: $(BIN)/.installed-bench compiled
	$(BIN)/python -m bench

# The bookinfo demo (examples/bookinfo): every service on 127.0.0.1, traffic, a live view of
# golden signals while Istio scenarios change; Ctrl-C stops it. E.g. make demo ARGS="--duration 60"
# (ARGS="--help" lists the options).
ARGS ?=
demo: $(BIN)/.installed
	$(BIN)/python -m examples.bookinfo $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build dist
	find meshlib -name "*.so" -delete; rm -f *__mypyc.*.so  # stray extensions of a compiled build
