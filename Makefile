# The README's two commands: `make demo` and `make test`. Both create the pinned
# virtual environment in .venv on first use (see README "Install").
PYTHON ?= python3.11
VENV ?= .venv
VPY := $(VENV)/bin/python
UV ?= $(VENV)/bin/uv
# GPU=1: also install TensorFlow's CUDA libraries (requirements-gpu.txt).
GPU ?=
STAMP := $(VENV)/.installed$(if $(GPU),-gpu,)
UV_VERSION := 0.5.4
# The locks: the whole resolution of requirements.txt (and of
# requirements.txt + requirements-gpu.txt), every package pinned with hashes.
# `make lock` regenerates them; `make install` installs from one of them.
LOCK ?= requirements.lock
GPU_LOCK ?= requirements-gpu.lock
INSTALL_LOCK := $(if $(GPU),$(GPU_LOCK),$(LOCK))
# UPGRADE=1: `make lock` moves every unpinned dependency to its newest release
# (otherwise it keeps the versions already in the locks where they still fit).
UPGRADE ?=
# The suite runs in parallel processes (pytest-xdist), one per core, at most
# 4: most of its time is single-threaded (TensorFlow tracing, TFF's compiler,
# process start-up), and each process can take a few GB. worksteal: an idle
# process takes queued tests from a busy one (the slow tests, queued first,
# do not end up waiting behind each other). PYTEST_ARGS="-n 0" runs the
# suite in one process.
PYTEST_ARGS ?= --numprocesses=auto --maxprocesses=4 --dist=worksteal
# Extra flags for `python -m benchmark.demo` (e.g. DEMO_FLAGS="--scale tiny").
DEMO_FLAGS ?=

.PHONY: install lock test demo clean-venv

install: $(STAMP)

$(VENV)/bin/uv:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# The lock is the whole resolution, so it is installed as it is (--no-deps):
# exactly those versions, each checked against its hashes. (TFF 0.87's own pin
# of jax 0.4.14 is replaced by overrides.txt when the lock is made.)
$(STAMP): $(INSTALL_LOCK) setup.py | $(UV)
	$(UV) pip install --python $(VPY) --require-hashes --no-deps -r $(INSTALL_LOCK)
	$(UV) pip install --python $(VPY) --no-deps -e .
	touch $(STAMP)

# TFF 0.87 pins jaxlib 0.4.14, which was never published; overrides.txt
# replaces jax/jaxlib with 0.4.13 (verified to work; README "Install").
# Both locks are for Linux x86-64 with Python 3.11, the only platform TFF
# 0.87 publishes a wheel for (manylinux_2_31); the GPU lock adds the CUDA
# wheels and is constrained by the CPU lock, so both pin the same versions.
UV_COMPILE = $(UV) pip compile --quiet --generate-hashes --python-version 3.11 \
	--override overrides.txt --custom-compile-command "make lock" $(if $(UPGRADE),--upgrade,)

lock: | $(UV)
	$(UV_COMPILE) --python-platform x86_64-manylinux_2_31 requirements.txt \
		-o $(LOCK)
	$(UV_COMPILE) --python-platform x86_64-manylinux_2_31 \
		requirements.txt requirements-gpu.txt -c $(LOCK) -o $(GPU_LOCK)

test: $(STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VPY) -m benchmark.demo $(if $(DATASET_DIR),--dataset_dir $(DATASET_DIR),) $(DEMO_FLAGS)

clean-venv:
	rm -rf $(VENV)
