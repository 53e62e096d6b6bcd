# sidecar: a local reverse proxy that adds Entra ID bearer tokens to Azure OpenAI requests.
#
#   docker build -t sidecar:dev .
#   docker run --rm -p 127.0.0.1:8080:8080 -e SIDECAR_LISTEN__HOST=0.0.0.0 ... sidecar:dev
#
# Runtime contract of this image (docs/deploy.md has the details):
#   * runs as UID/GID 10001, never root; works with a read-only root filesystem;
#   * the only paths it writes are $HOME (/var/lib/sidecar: token cache, XDG cache) and /tmp:
#     mount a volume/tmpfs/emptyDir on both when the root filesystem is read-only;
#   * listens on 127.0.0.1:8080 unless SIDECAR_LISTEN__HOST says otherwise (compose sets 0.0.0.0;
#     a Kubernetes sidecar shares the pod's loopback and keeps 127.0.0.1);
#   * SIGTERM drains for SIDECAR_SHUTDOWN_GRACE seconds and exits 0.
#
# BASE_IMAGE may be any Debian-like image whose `python` is CPython >= 3.11 with venv and pip
# (scripts/container-test.sh builds with a debootstrapped stand-in). Both stages must use the same
# base so the venv's interpreter path is valid in the final stage.
ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1

WORKDIR /src

# Dependencies first, from pyproject.toml alone, so that a code change does not reinstall them.
COPY pyproject.toml ./
RUN python -m venv /opt/sidecar \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && /opt/sidecar/bin/pip install --no-cache-dir -r /tmp/requirements.txt

# Then the project itself (the README is optional for the build; .dockerignore keeps the rest out).
COPY pyproject.toml README.m[d] LICENS[E] ./
COPY sidecar ./sidecar
RUN /opt/sidecar/bin/pip install --no-cache-dir --no-deps . \
 && /opt/sidecar/bin/sidecar --help > /dev/null \
 && /opt/sidecar/bin/pip uninstall --yes pip setuptools wheel \
 && rm -rf /opt/sidecar/share

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

ARG SIDECAR_UID=10001
ARG SIDECAR_GID=10001

# HOME and XDG_CACHE_HOME point at the one directory the sidecar writes (token cache); it is the
# path that needs a writable mount when the root filesystem is read-only.
ENV PATH=/opt/sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/sidecar \
    XDG_CACHE_HOME=/var/lib/sidecar/.cache

RUN groupadd --system --gid "${SIDECAR_GID}" sidecar \
 && useradd --system --uid "${SIDECAR_UID}" --gid "${SIDECAR_GID}" --home-dir /var/lib/sidecar \
        --no-create-home --shell /usr/sbin/nologin sidecar \
 && install -d -o "${SIDECAR_UID}" -g "${SIDECAR_GID}" -m 0750 /var/lib/sidecar

COPY --from=builder /opt/sidecar /opt/sidecar

USER 10001:10001
WORKDIR /var/lib/sidecar
EXPOSE 8080

# Liveness only (/healthz): the venv's python, no curl/wget. Proxies from the environment are ignored;
# the address follows SIDECAR_LISTEN__HOST/PORT (a wildcard address is probed on loopback).
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["/opt/sidecar/bin/python", "-c", "import os, urllib.request as u; h = os.environ.get('SIDECAR_LISTEN__HOST') or '127.0.0.1'; h = '127.0.0.1' if h in ('0.0.0.0', '::', '[::]') else h; h = '[' + h + ']' if ':' in h and not h.startswith('[') else h; u.build_opener(u.ProxyHandler({})).open('http://%s:%s/healthz' % (h, os.environ.get('SIDECAR_LISTEN__PORT') or '8080'), timeout=2)"]

ENTRYPOINT ["sidecar"]
CMD ["serve"]
