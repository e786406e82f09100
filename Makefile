# The few commands the README shows. `make test` and `make demo` build .venv from nothing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Where there is no NVIDIA GPU, take PyTorch's CPU build (a few hundred MB instead of several GB).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

# An AVX2-only x86-64 CPU without bf16 instructions, emulated on any x86-64 machine: PyTorch's kernels,
# oneDNN and MKL stop at AVX2, and gpt2lab's bf16 probe says no (README, "Tests").
AVX2_ENV := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 GPT2LAB_CPU_BF16=0

.PHONY: setup chromium demo test test-avx2 lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing the CUDA build of torch"; \
		$(BIN)/pip install "torch>=2.2"; \
	elif [ "$$(uname -s)" = "Linux" ]; then \
		echo "no NVIDIA GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
		$(BIN)/pip install --retries 1 --extra-index-url $(TORCH_CPU_INDEX) "torch==$(TORCH_VERSION)"; \
	else \
		$(BIN)/pip install "torch==$(TORCH_VERSION)"; \
	fi
	$(BIN)/pip install -e '.[dev]'
	@touch $@

# The playground's browser test drives Debian's chromium (tests/test_serve_playground.py). As root with
# apt-get, install it where it is missing; elsewhere say that the test will skip.
chromium:
	@if command -v chromium >/dev/null 2>&1; then \
		:; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's chromium for the playground's browser test"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	else \
		echo "no chromium, and no apt-get as root to install it: the playground's browser test will skip"; \
	fi

demo: setup
	$(BIN)/python -m gpt2lab.demo

test: setup chromium
	$(BIN)/python -m pytest -q

test-avx2: setup chromium
	$(AVX2_ENV) $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

# The CPU benchmarks behind docs/performance.md (about 10 minutes); bench/gpu.sh is for a GPU machine.
bench: setup
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/prepare.py
	$(BIN)/python bench/train_cpu.py
	$(BIN)/python bench/eval.py
	$(BIN)/python bench/tokenizer.py
	$(BIN)/python bench/startup.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
