# The two commands of the README: `make demo` (install, then the main job on the embedded demo data) and
# `make test` (install, then lint and every test). Both create .venv on first use and reinstall only when
# pyproject.toml changes. `make demo EPOCHS=2` overrides the default number of epochs.
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
EPOCHS ?=
PYTEST_ARGS ?=

.PHONY: install demo test ui

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	PATH="$(BIN):$$PATH" $(BIN)/mlflow run . --env-manager local --experiment-name cifake $(if $(EPOCHS),-P epochs=$(EPOCHS))

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

ui: install
	$(BIN)/mlflow ui --backend-store-uri "$(MLFLOW_TRACKING_URI)" --host 127.0.0.1 --port 5000
