# The two commands of the README:
#   make quickstart   set up .venv and train the quick start on 2 MPI ranks
#   make test         set up .venv and run the whole test suite
# and one for CI:
#   make test-compat  the tests that lean on DeepSpeed's internals, against
#                     the DeepSpeed of ALCF's Polaris module, in a second venv
# Everything lands in .venv (override with VENV=...); no system MPI needed:
# the `local` extra brings MPICH from PyPI.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
NP ?= 2
RUN_DIR ?= runs/quickstart
PYTEST_ARGS ?= --durations=25
# Three pytest workers (PYTEST_WORKERS=0: none). Most tests start MPI ranks
# and wait on them, on Slurm, on a collective timeout or on a package install;
# the other workers run meanwhile. On 2 cores three keep both busier than two
# and as busy as four. Tests of one file share a worker, so a module's
# fixture trains once.
PYTEST_WORKERS ?= 3
XDIST = -n $(PYTEST_WORKERS) --dist loadfile
export DS_ACCELERATOR ?= cpu
# DeepSpeed JIT-builds a shared-memory comm op on the CPU; its cache is keyed
# by the source paths, so two environments sharing ~/.cache/torch_extensions
# rebuild it over each other. One cache per environment, built once at install.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
# The venv's bin first on PATH, for everything that runs ranks or builds the
# op: torch builds with the first ninja on PATH, and a build by another ninja
# (the system's) does not count as built for the venv's, so the first run
# would build the op again.
WITH_VENV_PATH = PATH=$(abspath $(BIN)):$$PATH
BUILD_SHM_OP = $(WITH_VENV_PATH) $(PY) -c "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()"
# CIFAR-10 as JPEGs (docs/data.md) for tests/integration/test_cifar10.py,
# which skips without it; the development machines keep it beside the clone.
export PRELORA_CIFAR10_TARBALL ?= $(abspath $(wildcard ../shared/data/cifar10-trainval.tar.gz))

# The site's DeepSpeed: Polaris' default module (conda/2025-09-25) ships
# DeepSpeed 0.17.6. Engine rebuilds, the optimizer-state carry and resume use
# DeepSpeed's ZeRO/bf16 internals, so those tests also run against it. Its
# environment is .venv with DeepSpeed 0.17.6 installed into a directory that
# goes first on PYTHONPATH: torch, timm, MPI and this package are exactly
# .venv's, only DeepSpeed differs, and it builds in about a minute (a second
# full venv unpacks another 6 GB of torch and CUDA wheels).
VENV_COMPAT ?= .venv-ds0176
DEEPSPEED_COMPAT ?= 0.17.6
COMPAT_SITE = $(abspath $(VENV_COMPAT))/site
# Those tests carry the `compat` marker (pyproject.toml).

.PHONY: venv quickstart test clean venv-compat test-compat clean-compat

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# torch first: DeepSpeed's setup.py imports it, so DeepSpeed is built
	# against this torch without build isolation (which would fetch another).
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --no-build-isolation deepspeed==0.19.8
	$(PY) -m pip install -q -e '.[local,test]'
	$(BUILD_SHM_OP)
	touch $@

venv: $(VENV)/.installed

quickstart: venv
	$(WITH_VENV_PATH) $(BIN)/mpiexec -n $(NP) $(BIN)/prelora-train --config configs/quickstart.yaml --output-dir $(RUN_DIR)

test: venv
	$(WITH_VENV_PATH) $(PY) -m pytest -ra $(XDIST) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info

# Its own torch extensions cache: the shared-memory op is built against this
# DeepSpeed's sources (see TORCH_EXTENSIONS_DIR above).
$(VENV_COMPAT)/.installed venv-compat test-compat: export TORCH_EXTENSIONS_DIR = $(abspath $(VENV_COMPAT))/torch_extensions
$(VENV_COMPAT)/.installed venv-compat test-compat: export PYTHONPATH = $(COMPAT_SITE)

$(VENV_COMPAT)/.installed: $(VENV)/.installed
	rm -rf $(VENV_COMPAT)
	mkdir -p $(VENV_COMPAT)
	echo '*' > $(VENV_COMPAT)/.gitignore
	$(PY) -m pip install -q --no-deps --no-build-isolation --target $(COMPAT_SITE) deepspeed==$(DEEPSPEED_COMPAT)
	$(PY) scripts/compat_check.py $(DEEPSPEED_COMPAT) $(COMPAT_SITE)
	$(BUILD_SHM_OP)
	touch $@

venv-compat: $(VENV_COMPAT)/.installed

test-compat: venv-compat
	$(PY) scripts/compat_check.py $(DEEPSPEED_COMPAT) $(COMPAT_SITE)
	$(WITH_VENV_PATH) $(PY) -m pytest -ra -m compat $(XDIST) $(PYTEST_ARGS)

clean-compat:
	rm -rf $(VENV_COMPAT)
