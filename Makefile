# ProlifScore: `make demo` runs the main job, `make test` runs the tests. Both set up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/prolifscore/v1/*.proto)
PROTO_OUT := services/prolifscore/v1
PROTO_STAMP := $(PROTO_OUT)/.generated
# The viewer's browser dependencies (OpenSeadragon), pinned by its package-lock.json.
VIEWER_WEB := services/prolifscore/viewer/web
VIEWER_JS := $(VIEWER_WEB)/node_modules/.installed

.PHONY: setup protos demo test test-fast lint bench bench-update bench-training lock clean chromium

setup: $(STAMP) $(PROTO_STAMP) k8s-tools $(VIEWER_JS) chromium

$(DEPS): requirements/lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/lock.txt
	touch $@

$(STAMP): $(DEPS) $(PROTO_STAMP) pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

protos: $(PROTO_STAMP)

# protos/prolifscore/v1/x.proto -> services/prolifscore/v1/x_pb2.py, imported as prolifscore.v1
# (git-ignored).
$(PROTO_STAMP): $(PROTO_SRC) $(DEPS)
	rm -rf $(PROTO_OUT)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=services --pyi_out=services \
	  --grpc_python_out=services $(PROTO_SRC)
	touch $(PROTO_OUT)/__init__.py $@

# npm ci into the viewer's own folder (not the repository root); node_modules is git-ignored.
# Debian's nodejs/npm are installed first where npm is missing (as root).
$(VIEWER_JS): $(VIEWER_WEB)/package.json $(VIEWER_WEB)/package-lock.json
	@command -v npm >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm) \
	  >/dev/null; } || { echo "npm is missing: install Node.js and npm" >&2; exit 1; }
	cd $(VIEWER_WEB) && npm ci --no-audit --no-fund --loglevel=error >/dev/null
	touch $@

# Debian's Chromium for the viewer's browser test (tests/e2e/test_viewer_browser.py), once.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	  >/dev/null 2>&1; } || echo "note: no chromium: the viewer's browser test will fail" >&2

demo: setup
	$(PY) -m prolifscore.cli.main demo

# Everything: unit, end-to-end (real broker, Ray and service processes) and deployment checks.
test: setup
	$(PY) -m pytest -q

# The unit tests alone (no broker, no service processes; under 2 minutes on 2 cores).
test-fast: setup
	$(PY) -m pytest -q tests/unit -m "not slow"

lint: setup
	$(VENV)/bin/ruff check services tests bench
	$(VENV)/bin/ruff format --check services tests bench

# Writes build/bench/results.json and prints the table; the committed figures stay as they are.
bench: setup
	$(PY) -m bench.run

# The same run, written to the committed figures: bench/results.json and the README's benchmark
# table (tests/unit/test_readme.py checks that they match).
bench-update: setup
	$(PY) -m bench.run --update

# Offline Kubernetes checks (tests/deploy): render the k8s/ base and overlays and the Helm chart
# with several value sets, validate core objects against the pinned Kubernetes schemas
# (kubernetes-validate --strict) and custom resources against the operators' published schemas
# (npm @kubernetes-models: KEDA, cert-manager, Prometheus Operator; Ray's own autoscaler config
# for RayClusters), PromQL with promql-parser, and check policy and code consistency.
.PHONY: k8s-validate k8s-tools
k8s-validate: setup
	$(PY) -m pytest -q tests/deploy

# The npm packages those checks read (tests/deploy/package.json, pinned by its package-lock.json).
K8S_NPM_STAMP := tests/deploy/node_modules/.installed
k8s-tools: $(K8S_NPM_STAMP)

$(K8S_NPM_STAMP): tests/deploy/package.json tests/deploy/package-lock.json
	npm ci --prefix tests/deploy --no-audit --no-fund --loglevel=error
	touch $@

# Not part of CI (~25-40 min on 2 cores): does training learn? Writes bench/validate.json.
bench-training: setup
	$(PY) -m bench.validate

# Re-pin after editing requirements/*.in (needs the registry).
lock:
	rm -rf build/lockenv && $(PYTHON) -m venv build/lockenv
	build/lockenv/bin/pip install --quiet -r requirements/dev.in
	build/lockenv/bin/pip freeze > requirements/lock.txt

clean:
	rm -rf build $(PROTO_OUT) .pytest_cache $(VIEWER_WEB)/node_modules
