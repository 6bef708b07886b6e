# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Where the demo finds CIFAR-10 when SLIMRARTS_DATA is not set: the archive beside this checkout, if there.
SLIMRARTS_DATA ?= $(wildcard $(CURDIR)/../shared/data)
export SLIMRARTS_DATA

.PHONY: demo test test-slow mutation env clean-env

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install -q -e ".[test,plot,deploy,tasks,lightning]"
	touch $@

env: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/slimrarts run recipes/demo.yaml

test: $(BIN)/.installed
	$(BIN)/ruff check slimrarts tests benchmarks
	$(BIN)/python -m pytest -q

test-slow: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m slow

# Mutation testing of the modules that decide correctness ([tool.mutmut] in pyproject.toml), then the score per
# module. Slow (hours on 2 cores), so not part of `test`; results are cached in mutants/ (delete it to start afresh).
MUTATION_JOBS ?= 2
mutation: $(BIN)/.installed
	$(BIN)/python -c "import mutmut" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[mutation]"
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children $(MUTATION_JOBS)
	$(BIN)/python benchmarks/mutation_score.py --survivors

clean-env:
	rm -rf $(VENV)
