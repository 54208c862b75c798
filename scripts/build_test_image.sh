#!/usr/bin/env bash
# Builds gpusm's local Docker test images from nothing: no registry, no Dockerfile pulls.
#
#   gpusm-test-busybox:latest  a static busybox root filesystem (sh, sleep, trap...), for the
#                              runtime contract tests (sleeping, ignoring SIGTERM, forking).
#   gpusm-test-python:latest   the same root filesystem plus /etc files a Python program
#                              expects; the tests run the fake model server in it with the
#                              host's Python, the repository and /usr bind-mounted read-only
#                              (see tests/runtimes/docker_helpers.py).
#
# Needs: a running Docker engine and a static busybox (Debian: apt-get install busybox-static).
# Idempotent: an image whose gpusm.build label matches this script and busybox is kept.
# Usage: bash scripts/build_test_image.sh [--force]
set -euo pipefail

force=0
[[ "${1:-}" == "--force" ]] && force=1

die() { echo "build_test_image: $*" >&2; exit 1; }

command -v docker >/dev/null || die "the docker CLI is missing (apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "no Docker engine answers; start dockerd first"

busybox="${BUSYBOX:-}"
if [[ -z "$busybox" ]]; then
    for candidate in /bin/busybox /usr/bin/busybox "$(command -v busybox || true)"; do
        [[ -n "$candidate" && -x "$candidate" ]] && { busybox="$candidate"; break; }
    done
fi
[[ -n "$busybox" && -x "$busybox" ]] ||
    die "busybox not found (${busybox:-none}); install busybox-static (apt-get install busybox-static)"
# A dynamically linked busybox would need the host's libc inside the image.
if ldd "$busybox" >/dev/null 2>&1; then
    die "$busybox is dynamically linked; install busybox-static or set BUSYBOX=/path/to/static/busybox"
fi

stamp="$( (cat "${BASH_SOURCE[0]}" "$busybox") | sha256sum | cut -c1-16)"

up_to_date() {
    local have
    have="$(docker image inspect -f '{{index .Config.Labels "gpusm.build"}}' "$1" 2>/dev/null || true)"
    [[ $force -eq 0 && "$have" == "$stamp" ]]
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

make_rootfs() {  # $1 = target directory
    local root="$1" applet
    mkdir -p "$root"/{bin,etc,tmp,root,proc,sys,dev}
    chmod 1777 "$root/tmp"
    cp "$busybox" "$root/bin/busybox"
    for applet in $("$busybox" --list); do
        [[ "$applet" == busybox ]] || ln -sf busybox "$root/bin/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' \
        >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
}

import_rootfs() {  # $1 = directory, $2 = image tag
    local old
    old="$(docker image inspect -f '{{.Id}}' "$2" 2>/dev/null || true)"
    tar -C "$1" --numeric-owner -c . | docker import \
        --change "LABEL gpusm.build=$stamp" \
        --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin' \
        --change 'CMD ["sh"]' \
        - "$2" >/dev/null
    # Drop the image this one replaced (kept if a container still uses it).
    [[ -n "$old" ]] && docker image rm "$old" >/dev/null 2>&1 || true
    echo "build_test_image: built $2"
}

if up_to_date gpusm-test-busybox:latest; then
    echo "build_test_image: gpusm-test-busybox:latest is up to date"
else
    make_rootfs "$work/busybox"
    import_rootfs "$work/busybox" gpusm-test-busybox:latest
fi

if up_to_date gpusm-test-python:latest; then
    echo "build_test_image: gpusm-test-python:latest is up to date"
else
    make_rootfs "$work/python"
    # Python's lib and the tools it calls look for these; /usr and the interpreter come
    # from bind mounts at run time, so the image always matches the host's Python.
    printf 'hosts: files dns\n' >"$work/python/etc/nsswitch.conf"
    mkdir -p "$work/python/usr" "$work/python/lib" "$work/python/lib64"
    import_rootfs "$work/python" gpusm-test-python:latest
fi
