# The two commands of the README:
#   make quickstart   set up .venv and train the quick start on 2 MPI ranks
#   make test         set up .venv and run the whole test suite
# Everything lands in .venv (override with VENV=...); no system MPI needed:
# the `local` extra brings MPICH from PyPI.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
NP ?= 2
RUN_DIR ?= runs/quickstart
PYTEST_ARGS ?=
export DS_ACCELERATOR ?= cpu
# DeepSpeed JIT-builds a shared-memory comm op on the CPU; its cache is keyed
# by the source paths, so two environments sharing ~/.cache/torch_extensions
# rebuild it over each other. One cache per environment, built once at install.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: venv quickstart test clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# torch first: DeepSpeed's setup.py imports it, so DeepSpeed is built
	# against this torch without build isolation (which would fetch another).
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --no-build-isolation deepspeed==0.19.8
	$(PY) -m pip install -q -e '.[local,test]'
	$(PY) -c "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()"
	touch $@

venv: $(VENV)/.installed

quickstart: venv
	$(BIN)/mpiexec -n $(NP) $(BIN)/prelora-train --config configs/quickstart.yaml --output-dir $(RUN_DIR)

test: venv
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m pytest -ra $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info
