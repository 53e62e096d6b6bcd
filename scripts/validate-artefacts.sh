#!/usr/bin/env bash
# Fast checks of the shipping artefacts (Dockerfile, .dockerignore, docker-compose.yml + compose/,
# deploy/kubernetes/, scripts/): hadolint, docker compose config, kubectl kustomize (every directory, and the
# component on a sample), kubernetes-validate --strict, shellcheck, property assertions, and the health checks
# and probe paths run against loopback servers. No Docker engine or network needed; a few seconds.
# The checks live in tests/deploy/test_artefacts.py (also run by `make test`); this runs just them.
#   scripts/validate-artefacts.sh [pytest args...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=python3
if [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
fi
exec "$python" -m pytest tests/deploy/test_artefacts.py -q "$@"
