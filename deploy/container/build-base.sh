#!/usr/bin/env bash
# Builds a local base image, localhost/edgefleet-base, from Debian packages:
# debootstrap bookworm (minbase) plus python3, python3-venv and the C/C++
# runtime llama.cpp links against, imported with `podman import`. For machines
# that reach Debian's archive but no image registry; elsewhere the images
# build on the public python:3.11-slim and this script is not needed.
#
#   deploy/container/build-base.sh            # once; skipped when the image exists
#   FORCE=1 deploy/container/build-base.sh    # rebuild it
#
# Needs root (debootstrap), podman and debootstrap; installs them with apt-get
# when missing and running as root. MIRROR overrides the Debian mirror.
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE=${BASE_IMAGE_NAME:-localhost/edgefleet-base:bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
PACKAGES=python3,python3-venv,libgomp1,libstdc++6,ca-certificates
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/container/containers.conf}

say() { printf '\033[1m[base]\033[0m %s\n' "$*"; }

missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing ${missing[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    else
        say "missing: ${missing[*]} (install them, then run again)"; exit 1
    fi
fi
if [ "$(id -u)" != 0 ]; then
    say "debootstrap needs root; run this as root, or build on python:3.11-slim instead"; exit 1
fi

if [ -z "${FORCE:-}" ] && podman image exists "$IMAGE"; then
    say "$IMAGE exists (FORCE=1 to rebuild)"
    exit 0
fi

root=$(mktemp -d /var/tmp/edgefleet-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
say "debootstrap $SUITE ($PACKAGES) from $MIRROR; a few minutes"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
    || { tail -20 "$root.log"; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
# What an image does not need: package lists, caches, docs, man pages.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/tmp/*
# The image's apt reads the same Debian sources as the host's debootstrap.
printf 'deb %s %s main\ndeb %s %s-updates main\n' "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" \
    >"$root/etc/apt/sources.list"

say "importing as $IMAGE"
tar -C "$root" -c . | podman import --quiet \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    - "$IMAGE" >/dev/null
podman image ls "$IMAGE"
