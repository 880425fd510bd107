# asib: the two set-up commands are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint fashion-mnist clean

install: $(STAMP)

# The venv is complete when the stamp is newer than pyproject.toml; otherwise (re)install.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check asib tests

FMNIST_DIR := /usr/share/datasets/fashion-mnist
fashion-mnist:
	@if ls $(FMNIST_DIR)/train-images-idx3-ubyte* >/dev/null 2>&1; then \
		echo "Fashion-MNIST is in $(FMNIST_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist && ls $(FMNIST_DIR); \
	else \
		echo "apt-get not found: put the four IDX files (train/t10k images and labels, .gz or raw) in a folder"; \
		echo "and set data.root in recipes/fashion_mnist.yaml, or set data.download: true to use torchvision's downloader."; \
		exit 1; \
	fi

clean:
	rm -rf data runs
