#!/bin/sh
# Install or upgrade an edgefleet node from this offline bundle; no network needed.
#
#   sudo ./install.sh --join TOKEN --coordinator HOST:PORT
#   ./install.sh --join TOKEN --coordinator HOST:PORT --prefix DIR --state-dir DIR --no-systemd
#
# `./install.sh --help` lists every option. This wrapper checks the machine's
# architecture and finds a Python matching the bundle (--python PATH or
# $EDGEFLEET_PYTHON to choose one); installer.py, next to it, does the rest.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
manifest="$here/manifest.json"
if [ ! -r "$manifest" ] || [ ! -r "$here/installer.py" ]; then
    echo "error: run install.sh from an unpacked bundle (manifest.json, installer.py next to it)" >&2
    exit 1
fi
field() { sed -n "s/^  \"$1\": \"\([^\"]*\)\".*/\1/p" "$manifest" | head -n 1; }
want_arch=$(field arch)
want_python=$(field python)
arch=$(uname -m)
case "$arch" in amd64) arch=x86_64 ;; arm64) arch=aarch64 ;; esac
if [ "$arch" != "$want_arch" ]; then
    echo "error: this bundle is for $want_arch, this machine is $arch: build one with \`edgefleet bundle --arch $arch\`" >&2
    exit 1
fi
explicit=""
prev=""
for arg in "$@"; do
    if [ "$prev" = "--python" ]; then explicit=$arg; fi
    case "$arg" in --python=*) explicit=${arg#--python=} ;; esac
    prev=$arg
done
python=""
found=""
for candidate in ${explicit:-${EDGEFLEET_PYTHON:-} python$want_python python3}; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    version=$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || continue
    if [ "$version" = "$want_python" ]; then
        python=$candidate
        break
    fi
    found="$found${found:+, }$candidate is $version"
done
if [ -z "$python" ]; then
    echo "error: this bundle is for Python $want_python (${found:-no python3 found}): install python$want_python, or build a bundle with this machine's Python" >&2
    exit 1
fi
exec "$python" "$here/installer.py" "$@"
