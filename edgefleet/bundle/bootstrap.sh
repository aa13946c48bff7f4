#!/bin/sh
# edgefleet node bootstrap, served by a coordinator to holders of a join token:
#
#   curl -fsSL ... -H "Authorization: Bearer TOKEN" https://COORD:PORT/install.sh \
#       | sudo sh -s -- --join TOKEN [install.sh options]
#
# Downloads the node bundle for this machine from the coordinator (resuming a
# partial download), checks its sha256, unpacks it and runs its install.sh
# with your arguments (and --coordinator, unless you give one). The
# downloads trust exactly what this script was fetched with: the fleet CA
# below, or the system's CAs, or plain HTTP on the coordinator's own loopback.
set -eu

BASE_URL=@@BASE_URL@@
CONNECT_TO=@@CONNECT_TO@@
COORDINATOR=@@COORDINATOR@@
CA_PEM=@@CA_PEM@@
# One line per bundle: arch, Python, file, sha256, size.
BUNDLES=@@BUNDLES@@

die() {
    echo "error: $*" >&2
    exit 1
}

sha256() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d ' ' -f 1
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | cut -d ' ' -f 1
    else
        python3 -c 'import hashlib,sys; h=hashlib.sha256(); f=open(sys.argv[1],"rb"); [h.update(b) for b in iter(lambda: f.read(1<<20), b"")]; print(h.hexdigest())' "$1"
    fi
}

fetch() {  # URL FILE: download, resuming FILE when it holds a partial download
    if [ -n "$CA_PEM" ]; then
        curl -fL --retry 5 --retry-delay 2 -C - --cacert "$dir/fleet-ca.pem" \
            --connect-to "$CONNECT_TO" -H "@$dir/auth-header" -o "$2" "$1" </dev/null
    else
        curl -fL --retry 5 --retry-delay 2 -C - -H "@$dir/auth-header" -o "$2" "$1" </dev/null
    fi
}

main() {
    token=""
    given=""
    prev=""
    for arg in "$@"; do
        if [ "$prev" = "--join" ]; then token=$arg; fi
        case "$arg" in
            --join=*) token=${arg#--join=} ;;
            --coordinator | --coordinator=*) given=1 ;;
        esac
        prev=$arg
    done
    [ -n "$token" ] || die "--join TOKEN is required (... | sudo sh -s -- --join TOKEN)"
    command -v curl >/dev/null 2>&1 || die "curl is needed to download the bundle"
    command -v tar >/dev/null 2>&1 || die "tar is needed to unpack the bundle"

    arch=$(uname -m)
    case "$arch" in amd64) arch=x86_64 ;; arm64) arch=aarch64 ;; esac
    python=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
    line=$(printf '%s\n' "$BUNDLES" | awk -v a="$arch" -v p="$python" '$1 == a && $2 == p' | head -n 1)
    if [ -z "$line" ]; then
        line=$(printf '%s\n' "$BUNDLES" | awk -v a="$arch" '$1 == a' | head -n 1)
    fi
    if [ -z "$line" ]; then
        have=$(printf '%s\n' "$BUNDLES" | awk 'NF { printf "%s%s (Python %s)", s, $1, $2; s = ", " }')
        die "the coordinator has no node bundle for $arch (it has: ${have:-none}); build one with \`edgefleet bundle --arch $arch\` into its --bundle-dir"
    fi
    file=$(printf '%s\n' "$line" | awk '{ print $3 }')
    want=$(printf '%s\n' "$line" | awk '{ print $4 }')
    size=$(printf '%s\n' "$line" | awk '{ print $5 }')

    dir=${EDGEFLEET_DOWNLOAD_DIR:-/var/tmp/edgefleet-download}
    mkdir -p "$dir"
    chmod 700 "$dir"
    (
        umask 077  # the token, for curl -H @file: never on a command line
        printf 'Authorization: Bearer %s\n' "$token" >"$dir/auth-header"
    )
    if [ -n "$CA_PEM" ]; then printf '%s\n' "$CA_PEM" >"$dir/fleet-ca.pem"; fi

    target="$dir/$file"
    if [ -f "$target" ] && [ "$(sha256 "$target")" = "$want" ]; then
        echo "[bootstrap] $file already downloaded"
    else
        part="$target.part"
        have=0
        if [ -f "$part" ]; then have=$(wc -c <"$part" | tr -d ' '); fi
        if [ "$have" -gt "$size" ]; then rm -f "$part"; have=0; fi
        if [ "$have" -lt "$size" ]; then
            if [ "$have" -gt 0 ]; then
                echo "[bootstrap] resuming $file at $have of $size bytes"
            else
                echo "[bootstrap] downloading $file ($size bytes)"
            fi
            fetch "$BASE_URL/bundle/$file" "$part" || die "could not download $BASE_URL/bundle/$file (run again to resume)"
        fi
        got=$(sha256 "$part")
        if [ "$got" != "$want" ]; then
            rm -f "$part"
            die "$file does not match its sha256 (got $got, want $want); removed it, run again"
        fi
        mv "$part" "$target"
    fi
    echo "[bootstrap] $file: sha256 ok"

    unpack=$(mktemp -d "$dir/unpack.XXXXXX")
    trap 'rm -rf "$unpack" "$dir/auth-header"' EXIT INT TERM
    tar -xzf "$target" -C "$unpack" || die "cannot unpack $target"
    installer="$unpack/${file%.tar.gz}/install.sh"
    [ -f "$installer" ] || die "$file holds no ${file%.tar.gz}/install.sh"
    if [ -z "$given" ]; then set -- "$@" --coordinator "$COORDINATOR"; fi
    status=0
    sh "$installer" "$@" </dev/null || status=$?
    if [ "$status" = 0 ]; then rm -f "$target"; fi
    return "$status"
}

main "$@"
