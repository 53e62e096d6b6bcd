# sidecar: a local reverse proxy that adds Entra ID bearer tokens to Azure OpenAI requests.
#
#   docker build -t sidecar:dev .                         # the production image (the default, last stage)
#   docker build --target dev -t sidecar-dev:dev .        # + the emulators and openai (compose dev stack)
#   docker run --rm -p 127.0.0.1:8080:8080 -e SIDECAR_LISTEN__HOST=0.0.0.0 ... sidecar:dev
#
# Runtime contract of this image (docs/deploy.md has the details):
#   * runs as UID/GID 10001, never root; works with a read-only root filesystem;
#   * the only paths it writes are $HOME (/var/lib/sidecar: token cache, XDG cache) and /tmp:
#     mount a volume/tmpfs/emptyDir on both when the root filesystem is read-only;
#   * the proxy listens on 127.0.0.1:8080 unless SIDECAR_LISTEN__HOST says otherwise (compose sets 0.0.0.0;
#     a Kubernetes sidecar shares the pod's loopback and keeps 127.0.0.1);
#   * the admin listener (GET /healthz, /readyz, /metrics only, never the proxy) is on 0.0.0.0:9090
#     (SIDECAR_ADMIN__HOST/PORT), for httpGet probes, Prometheus and the HEALTHCHECK;
#   * SIGTERM drains for SIDECAR_SHUTDOWN_GRACE seconds and exits 0.
#
# Dependencies come from requirements.lock (pinned, hash-checked; `make lock` regenerates it), never from a
# fresh resolution: two builds of one commit install the same files. The production image holds the proxy
# and its dependencies only, with the `otel` extra (OpenTelemetry: setting OTEL_EXPORTER_OTLP_ENDPOINT turns
# tracing on; unset, no OpenTelemetry module is imported): no emulators, no openai, no trustme, no pip.
#
# BASE_IMAGE may be any Debian-like image whose `python` is CPython >= 3.11 with venv and pip
# (scripts/container-test.sh builds with a debootstrapped stand-in). All stages must use the same
# base so the venv's interpreter path is valid in the final stages.
# SIDECAR_VERSION goes into the org.opencontainers.image.version label; the build fails when it is set
# and is not the version of the package it builds (sidecar/__init__.py is the one place it is written).
ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1

WORKDIR /src

# Dependencies first, from the lock alone, so that a code change does not reinstall them.
COPY requirements.lock ./
RUN python -m venv /opt/sidecar \
 && /opt/sidecar/bin/pip install --no-cache-dir --require-hashes -r requirements.lock

# Then the project itself, without resolving anything (.dockerignore keeps the rest of the tree out).
# `pip check` fails the build when pyproject.toml asks for something the lock does not hold.
COPY pyproject.toml README.md LICENSE ./
COPY sidecar ./sidecar
ARG SIDECAR_VERSION=""
RUN /opt/sidecar/bin/pip install --no-cache-dir --no-deps . \
 && /opt/sidecar/bin/pip check \
 && built=$(/opt/sidecar/bin/sidecar --version) \
 && { [ -z "${SIDECAR_VERSION}" ] || [ "${built}" = "sidecar ${SIDECAR_VERSION}" ] \
      || { echo "SIDECAR_VERSION=${SIDECAR_VERSION} but the package is ${built}" >&2; exit 1; }; }

# ---------------------------------------------------------------------------------------------
# The production venv: the builder's, less the installers.
FROM builder AS runtime-venv
RUN /opt/sidecar/bin/pip uninstall --yes pip setuptools wheel \
 && rm -rf /opt/sidecar/share

# ---------------------------------------------------------------------------------------------
# The dev venv: the production one plus the emulators distribution (emulators/) and what it needs
# (openai, trustme), from its own hashed lock. Only the compose dev stack and container tests use it.
FROM builder AS dev-venv
COPY emulators/requirements.lock ./emulators/
RUN /opt/sidecar/bin/pip install --no-cache-dir --require-hashes -r emulators/requirements.lock
COPY emulators ./emulators
RUN /opt/sidecar/bin/pip install --no-cache-dir --no-deps ./emulators \
 && /opt/sidecar/bin/pip check \
 && /opt/sidecar/bin/python -m sidecar_emulators --help > /dev/null \
 && /opt/sidecar/bin/pip uninstall --yes pip setuptools wheel \
 && rm -rf /opt/sidecar/share

# ---------------------------------------------------------------------------------------------
# What both images share: the non-root user, the writable home, the labels.
FROM ${BASE_IMAGE} AS runtime-base

ARG SIDECAR_UID=10001
ARG SIDECAR_GID=10001
ARG SIDECAR_VERSION=""

LABEL org.opencontainers.image.title="entra-token-sidecar" \
      org.opencontainers.image.description="A local reverse proxy that attaches Entra ID bearer tokens to Azure OpenAI requests" \
      org.opencontainers.image.version="${SIDECAR_VERSION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.vendor="the sidecar authors"

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

USER 10001:10001
WORKDIR /var/lib/sidecar

# ---------------------------------------------------------------------------------------------
# The dev image (--target dev): `python -m sidecar_emulators` by default; compose also runs its example
# app (an openai SDK program) on it. Never deployed.
FROM runtime-base AS dev

LABEL org.opencontainers.image.title="entra-token-sidecar-dev" \
      org.opencontainers.image.description="entra-token-sidecar plus its offline emulators and the openai SDK, for the compose dev stack"

COPY --from=dev-venv /opt/sidecar /opt/sidecar

ENTRYPOINT ["python", "-m", "sidecar_emulators"]
CMD []

# ---------------------------------------------------------------------------------------------
# The production image: the default target, so it must stay the last stage.
FROM runtime-base AS runtime

COPY --from=runtime-venv /opt/sidecar /opt/sidecar

# The admin listener is on in the image: probes and scrapers reach it on the container's address, and it
# never proxies, so it lends nobody the identity. The proxy's own address stays the deployment's choice.
ENV SIDECAR_ADMIN__HOST=0.0.0.0 \
    SIDECAR_ADMIN__PORT=9090

EXPOSE 8080 9090

# Liveness only (GET /healthz) on the admin listener, from bash's /dev/tcp: bash is already in the base
# (Debian's essential set), so no curl/wget/busybox is added and no second Python starts. Measured on the
# host (/usr/bin/time): ~3 MB peak RSS and ~1 ms per check, against ~20 MB and ~0.2 s of CPU for the
# `python -c urllib...` check it replaces; a check runs in the container's cgroup, so that was 20 MB on top
# of the proxy inside the container's memory limit every 10 s. A static busybox wget would add a package
# for nothing bash cannot do. The address follows
# SIDECAR_ADMIN__HOST/PORT, or SIDECAR_LISTEN__HOST/PORT when the admin port is unset; a wildcard address
# is probed on loopback. Raw TCP, so an HTTP proxy in the environment cannot capture the check.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["bash", "-c", "p=${SIDECAR_ADMIN__PORT:-}; if [[ ! ${p,,} =~ ^(|off|null|none)$ ]]; then h=${SIDECAR_ADMIN__HOST:-}; else h=${SIDECAR_LISTEN__HOST:-} p=${SIDECAR_LISTEN__PORT:-8080}; fi; h=${h#[}; h=${h%]}; case $h in ''|0.0.0.0) h=127.0.0.1 ;; ::) h=::1 ;; esac; exec 3<>/dev/tcp/$h/$p && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && IFS= read -r -t 2 s <&3 && [[ $s == HTTP/1.?' 200 '* ]]"]

ENTRYPOINT ["sidecar"]
CMD ["serve"]
