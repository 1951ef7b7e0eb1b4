# Two entry points for a fresh machine with Python 3.10+: `make demo` and `make test`.
# Both build .venv first. crypten 0.4.1 is installed with --no-deps because its
# wheel declares the uninstallable `sklearn` package; pyproject.toml declares
# crypten's real runtime needs instead.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# Keep a torch that is already there; otherwise take the pinned CPU build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --no-deps crypten==0.4.1
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(BIN)/mpcfl run configs/breast_cancer_lr.yaml
	@echo "mpcfl is installed in $(VENV): run \`source $(VENV)/bin/activate\` to put it on PATH (then \`mpcfl --help\`), or call $(BIN)/mpcfl"

# Two workers even on 2 cores: a test's parties mostly wait on each other's rounds. A file's tests stay in
# one worker: some build on what earlier ones left (the docs pages run in order in one workspace). More workers on a
# bigger machine: `make test TEST_WORKERS=4`.
TEST_WORKERS ?= 2

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: install
	$(BIN)/python benchmarks/inference.py
	$(BIN)/python benchmarks/soak.py

clean:
	rm -rf $(VENV) runs
