#!/usr/bin/env bash
# Make sure redis-server is installed (the Redis limiter tests start their own on a free port).
# Idempotent and quiet: does nothing when redis-server is already on PATH.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi

if [[ "$(id -u)" -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
else
    echo "install-redis: redis-server is missing and neither root nor sudo is available" >&2
    exit 1
fi

# apt output goes to a log shown only on failure, to stay quiet on success.
LOG="$(mktemp)"
trap 'rm -f "${LOG}"' EXIT
if ! { "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        && "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends redis-server; } >"${LOG}" 2>&1; then
    cat "${LOG}" >&2
    echo "install-redis: apt-get failed" >&2
    exit 1
fi

command -v redis-server >/dev/null 2>&1 || { echo "install-redis: install did not provide redis-server" >&2; exit 1; }
echo "install-redis: installed $(redis-server --version | head -n1)"
