# make train: set up .venv, fetch MNIST, train the default recipe, draw the pictures.
# make test:  set up .venv, run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN ?= runs/mnist
TRAIN_ARGS ?=

.PHONY: setup data train test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,plots]'
	touch $(STAMP)

setup: $(STAMP)

data: setup
	$(BIN)/capsnet data

# A second `make train` resumes the run where it stopped (or just redraws a finished one);
# TRAIN_ARGS=--force starts it over.
train: data
	@if [ -f $(RUN)/last.pt ] && ! echo " $(TRAIN_ARGS) " | grep -q -e " --force "; then \
		$(BIN)/capsnet train --resume $(RUN) --visualize $(TRAIN_ARGS); \
	else \
		$(BIN)/capsnet train --save $(RUN) --visualize $(TRAIN_ARGS); \
	fi

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info
