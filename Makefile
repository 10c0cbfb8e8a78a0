# Signalbox: `make run` serves the default policies on the built-in mock upstream; `make test` runs everything.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run

.PHONY: run test lint bench tools venv clean constraints docs docs-serve

# `make run` needs only the runtime dependencies; `make test` and `make lint` add the test extra.
# setuptools prints an informational note on every editable install (not a warning about this project).
QUIET_BUILD := PYTHONWARNINGS="ignore:Editable installation"

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(QUIET_BUILD) $(BIN)/pip install --quiet -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(QUIET_BUILD) $(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Development only: --admin-no-auth opens the admin API without a token, and serve refuses it
# unless the admin port binds to loopback (127.0.0.1 or ::1).
run: $(RUN_STAMP)
	$(BIN)/signalbox serve --policies policies --port 8080 --admin-host 127.0.0.1 --admin-port 9090 --admin-no-auth --demo

# helm (from an npm package), redis-server and promtool (Debian) are needed by the deployment,
# Redis and alert-rule tests; the Node SDKs (npm) by the tests that drive the mock with them;
# chromium and chromium-driver (Debian) by the dashboard test.
tools:
	bash scripts/install-helm.sh
	bash scripts/install-redis.sh
	bash scripts/install-prometheus.sh
	bash scripts/install-node-sdks.sh
	bash scripts/install-chromium.sh

test: $(STAMP) tools
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench docs/hooks
	$(BIN)/mypy

# Re-pin the image's runtime dependencies (constraints.txt) to the versions in the dev venv.
constraints: $(STAMP)
	$(BIN)/python scripts/refresh-constraints.py

# The manual (docs/, mkdocs.yml) into site/; the policy field reference is regenerated at every build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8008

bench: $(STAMP)
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) .tools build site *.egg-info
