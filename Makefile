# meshlib's entry points: the same commands locally and in CI.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: test lint typecheck unit bench demo clean

# Create the virtual environment and install meshlib with its test extra when
# missing or when pyproject.toml changed.
$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "meshlib needs Python >= 3.10")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

test: lint typecheck unit

lint: $(BIN)/.installed
	$(BIN)/ruff check meshlib tests bench
	$(BIN)/ruff format --check meshlib tests bench

typecheck: $(BIN)/.installed
	$(BIN)/mypy

unit: $(BIN)/.installed
	$(BIN)/pytest

bench: $(BIN)/.installed
	$(BIN)/python -m bench

demo:
	@echo "make demo arrives with the bookinfo demo (issue 5); see README.md" >&2
	@exit 2

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
