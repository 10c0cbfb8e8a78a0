#!/usr/bin/env bash
# Install promtool into <repo>/.tools/bin/promtool, idempotently (the alert-rule tests use it).
# Debian's `prometheus` package ships it, but installing that package pulls in the server, a system
# user and a dozen JavaScript packages (~100 MB) for one static binary: download the .deb with
# apt-get and extract only usr/bin/promtool.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="${REPO}/.tools/bin"
PROMTOOL="${BIN_DIR}/promtool"

if [[ -x "${PROMTOOL}" ]] && "${PROMTOOL}" --version >/dev/null 2>&1; then
    exit 0
fi

command -v apt-get >/dev/null 2>&1 || { echo "install-prometheus: apt-get is required" >&2; exit 1; }
command -v dpkg-deb >/dev/null 2>&1 || { echo "install-prometheus: dpkg-deb is required" >&2; exit 1; }

if [[ "$(id -u)" -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
else
    SUDO=()  # `apt-get download` needs no root; only refreshing the package lists does
fi

WORK="$(mktemp -d)"
LOG="${WORK}/apt.log"
trap 'rm -rf "${WORK}" "${PROMTOOL}.tmp"' EXIT

download() { (cd "${WORK}" && apt-get download -qq prometheus) >>"${LOG}" 2>&1; }
# Try the package lists as they are first; refresh them once if the package is not found there.
if ! download; then
    if ! { "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >>"${LOG}" 2>&1 && download; }; then
        cat "${LOG}" >&2
        echo "install-prometheus: could not download Debian's prometheus package" >&2
        exit 1
    fi
fi

dpkg-deb -x "${WORK}"/prometheus_*.deb "${WORK}/root"
mkdir -p "${BIN_DIR}"
# Write to a temp name and rename, so an interrupted run never leaves a half-written promtool.
cp "${WORK}/root/usr/bin/promtool" "${PROMTOOL}.tmp"
chmod +x "${PROMTOOL}.tmp"
mv -f "${PROMTOOL}.tmp" "${PROMTOOL}"

"${PROMTOOL}" --version >/dev/null 2>&1 || { echo "install-prometheus: ${PROMTOOL} does not run" >&2; exit 1; }
echo "install-prometheus: installed $("${PROMTOOL}" --version 2>&1 | head -n1) at ${PROMTOOL}"
