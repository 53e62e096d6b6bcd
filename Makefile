# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench soak container-test validate lock clean

# Two distributions, one venv: the proxy (with the dev tools) and the emulators + demo (emulators/).
$(STAMP): pyproject.toml emulators/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]' -e ./emulators
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sidecar demo

test: $(STAMP)
	$(VENV)/bin/ruff check sidecar emulators tests bench
	$(PY) -m pytest -q -p no:cacheprovider

# wrk and nginx come from apt when missing (as root, or through sudo); RUNLEVEL=1 keeps the package's own
# nginx service from starting: the benchmark runs its own instances on free loopback ports.
bench: $(STAMP)
	@command -v wrk >/dev/null && command -v nginx >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "make bench needs wrk and nginx: install them with your package manager" >&2; exit 2; }; \
	  as_root=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing wrk and nginx with apt-get ..."; \
	  $$as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $$as_root env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq wrk nginx >/dev/null; }
	$(PY) bench/run.py

# A few minutes of mixed, faulty load on one `sidecar serve`; fails on unexpected answers, RSS growth or
# descriptors that do not come back (bench/soak.py). Loopback only; not part of `make test`.
soak: $(STAMP)
	$(PY) bench/soak.py

validate: $(STAMP)
	scripts/validate-artefacts.sh

container-test: $(STAMP)
	scripts/container-test.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check sidecar emulators tests bench
	$(VENV)/bin/ruff format --check sidecar emulators tests bench

# The pinned, hashed dependency sets the image installs (Dockerfile): requirements.lock for the proxy with its
# `otel` extra (so the production image can trace when an operator sets OTEL_EXPORTER_OTLP_ENDPOINT; with
# tracing off no OpenTelemetry module is imported), emulators/requirements.lock for the dev image's emulators
# and example app (the proxy's pins plus what the emulators add; the local distributions themselves stay out
# and are installed with --no-deps).
# Run after changing a dependency in either pyproject.toml; `make lock LOCK_FLAGS=--upgrade` moves every pin.
LOCK_FLAGS ?=
PIP_COMPILE := $(VENV)/bin/pip-compile --quiet --generate-hashes --strip-extras --no-emit-index-url \
	--no-emit-find-links --no-emit-trusted-host $(LOCK_FLAGS)
lock: $(STAMP)
	$(PIP_COMPILE) --allow-unsafe --extra otel --output-file requirements.lock pyproject.toml
	$(PIP_COMPILE) --unsafe-package entra-token-sidecar --unsafe-package entra-token-sidecar-emulators \
	  --output-file emulators/requirements.lock emulators/requirements.in

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info emulators/build emulators/*.egg-info
