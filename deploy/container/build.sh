#!/usr/bin/env bash
# Builds the edgefleet images from this repository (`make image`):
#   edgefleet-node:VERSION and edgefleet-coordinator:VERSION (and :latest).
#
# Environment:
#   BASE_IMAGE   base to build on (default python:3.11-slim; on a machine with
#                no registry, localhost/edgefleet-base:bookworm from build-base.sh)
#   LLAMA_WHEEL  a compiled llama-cpp-python wheel to install (default: the
#                newest one in ~/.cache/edgefleet/wheels, which `make install`
#                builds); with none, the image build compiles llama.cpp itself
#                (portable, GGML_NATIVE=OFF; about 6 minutes on 2 cores)
#   OFFLINE=1    also put every other wheel the images need into the build
#                context (downloaded here with this machine's pip), and build
#                with no index: nothing is fetched inside the build
#   ENGINE       podman (default when installed) or docker
#   TARGETS      "node coordinator" (default)
#   CONTAINERS_CONF=deploy/container/containers.conf   podman on a sandbox
#                like the developers' machines (runc, no ulimits, host network)
set -euo pipefail
cd "$(dirname "$0")/../.."

ENGINE=${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
TARGETS=${TARGETS:-node coordinator}
CACHE=${EDGEFLEET_CACHE:-$HOME/.cache/edgefleet}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
WHEELS=deploy/container/wheels
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
LLAMA_VERSION=$(sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' pyproject.toml | head -1)

say() { printf '\033[1m[image]\033[0m %s\n' "$*"; }

# The build context's wheels/ is this run's alone: start it empty.
rm -rf "$WHEELS"
mkdir -p "$WHEELS"
wheel=${LLAMA_WHEEL:-$(ls -t "$CACHE"/wheels/llama-cpp-python-"$LLAMA_VERSION"-*/llama_cpp_python-"$LLAMA_VERSION"-*.whl 2>/dev/null | head -1 || true)}
if [ -n "$wheel" ]; then
    say "llama-cpp-python: $wheel (no compile in the image build)"
    cp "$wheel" "$WHEELS/"
else
    say "no cached llama-cpp-python $LLAMA_VERSION wheel: the image build compiles it"
fi
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
# podman keeps HEALTHCHECK only in Docker-format images.
[ "$ENGINE" = podman ] && build_args+=(--format docker)
if [ -n "${OFFLINE:-}" ]; then
    say "downloading every other wheel into the build context (OFFLINE=1)"
    # A wheel missing from every index (llama-cpp-python with no cached build)
    # is compiled here, portable across CPUs of this architecture.
    CMAKE_ARGS=${CMAKE_ARGS:--DGGML_NATIVE=OFF} "$PYTHON" -m pip wheel --quiet \
        --disable-pip-version-check --wheel-dir "$WHEELS" --find-links "$WHEELS" \
        . setuptools wheel 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
    rm -f "$WHEELS"/edgefleet-*.whl  # the image installs edgefleet from the source
    build_args+=(--build-arg PIP_NO_INDEX=1)
fi

start=$(date +%s)
for target in $TARGETS; do
    say "$ENGINE build --target $target on $BASE_IMAGE"
    previous=$("$ENGINE" image inspect --format '{{.Id}}' "edgefleet-$target:$VERSION" 2>/dev/null || true)
    "$ENGINE" build -f deploy/container/Containerfile --target "$target" "${build_args[@]}" \
        -t "edgefleet-$target:$VERSION" -t "edgefleet-$target:latest" .
    # The image these tags named before, if nothing else uses it now (no pile-up of old builds).
    if [ -n "$previous" ] && [ "$previous" != "$("$ENGINE" image inspect --format '{{.Id}}' "edgefleet-$target:$VERSION")" ]; then
        "$ENGINE" rmi "$previous" >/dev/null 2>&1 || true
    fi
done
# Earlier builds' intermediate stages (untagged): only this file's, by their label.
"$ENGINE" image prune -f --filter label=io.edgefleet.stage=build >/dev/null 2>&1 || true
say "built in $(($(date +%s) - start))s:"
for target in $TARGETS; do
    size=$("$ENGINE" image inspect --format '{{.Size}}' "edgefleet-$target:$VERSION")
    echo "  edgefleet-$target:$VERSION $((size / 1000000)) MB"
done
