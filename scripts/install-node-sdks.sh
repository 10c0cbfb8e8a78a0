#!/usr/bin/env bash
# Install the Node SDKs the mock is tested with (tests/node/package.json, pinned by its lockfile) into
# <repo>/.tools/node-sdks, idempotently: nothing is done while the installed lockfile is the same.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="${REPO}/tests/node"
DEST="${REPO}/.tools/node-sdks"

if [[ -d "${DEST}/node_modules" ]] && cmp -s "${SRC}/package-lock.json" "${DEST}/package-lock.json"; then
    exit 0
fi
command -v npm >/dev/null 2>&1 || { echo "install-node-sdks: npm is required" >&2; exit 1; }

# Install beside the destination and rename, so an interrupted run never leaves half a tree.
WORK="${DEST}.tmp"
rm -rf "${WORK}"
mkdir -p "${WORK}"
trap 'rm -rf "${WORK}"' EXIT
cp "${SRC}/package.json" "${SRC}/package-lock.json" "${WORK}/"
(cd "${WORK}" && npm ci --silent --no-audit --no-fund --ignore-scripts)
rm -rf "${DEST}"
mv "${WORK}" "${DEST}"
