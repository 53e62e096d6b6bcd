# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench soak container-test validate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sidecar demo

test: $(STAMP)
	$(VENV)/bin/ruff check sidecar tests bench
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
	$(VENV)/bin/ruff check sidecar tests bench
	$(VENV)/bin/ruff format --check sidecar tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
