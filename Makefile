# The two commands: `make test` and `make bench`. Each sets everything up on a fresh machine.
# `make fuzz` explores the test suite's properties with random draws for FUZZ_MINUTES.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
FUZZ_MINUTES ?= 20
# pytest-xdist workers for `make test`: the emulated CUDA device runs one thread, so a
# second worker uses the second core (tests/conftest.py gives each worker its share of
# torch's threads).
TEST_WORKERS ?= 2

.PHONY: install test fuzz bench clean

install: $(VENV)/.installed

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

$(VENV)/.installed: $(VENV)/.deps setup.py pyproject.toml tesloss/_build.py $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.cuh csrc/cuda/*.h csrc/cuda/*.cu)
	# editable_mode=compat puts the clone on sys.path (a .pth file): the package found
	# there wins over a folder named tesloss in the working directory (the clone itself,
	# seen from its parent), which setuptools' default finder loses to as an empty
	# namespace package.
	MAX_JOBS=2 $(PY) -m pip install --no-build-isolation --no-deps -e . --config-settings editable_mode=compat
	$(PY) -c "import tesloss, json; print(json.dumps(tesloss.backend_info()))"
	touch $@

test: install
	TESLOSS_REQUIRE_EXTENSION=1 $(PY) -m pytest -q -n $(TEST_WORKERS) tests

fuzz: install
	$(PY) tests/fuzz.py --minutes $(FUZZ_MINUTES)

bench: install
	$(PY) bench/bench_loss.py

clean:
	rm -rf build dist $(VENV) tesloss/*.so tesloss/_build_info.json *.egg-info
