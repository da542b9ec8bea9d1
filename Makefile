# Set-up and everyday commands. `make test` works on a fresh machine with only Python 3.11 and pip.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install data test test-fast demo table clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist package (installed when running as root and missing).
data:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist'" >&2; fi; fi

test: $(STAMP) data
	$(BIN)/python -m pytest -q -n auto --durations=25

test-fast: $(STAMP) data
	$(BIN)/python -m pytest -q -n auto -m "not slow"

demo: $(STAMP) data
	$(BIN)/bcosify demo

table: $(STAMP)
	$(BIN)/python scripts/support_table.py --write README.md
	$(BIN)/python scripts/recipe_table.py --write README.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
