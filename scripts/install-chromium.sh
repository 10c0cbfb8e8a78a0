#!/usr/bin/env bash
# Make sure Debian's headless-capable Chromium and its version-matched chromedriver are installed (the
# dashboard test drives the admin page in headless Chromium through Selenium; tests/kit/browser.py).
# Idempotent and quiet: does nothing when both are on PATH and answer --version. The package lists are
# refreshed once, only when the packages are not found in them.
set -euo pipefail

PACKAGES=(chromium chromium-driver)

present() {
    command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 \
        && chromium --version >/dev/null 2>&1 && chromedriver --version >/dev/null 2>&1
}

if present; then
    exit 0
fi

command -v apt-get >/dev/null 2>&1 || { echo "install-chromium: apt-get is required" >&2; exit 1; }
if [[ "$(id -u)" -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
else
    echo "install-chromium: chromium is missing and neither root nor sudo is available" >&2
    exit 1
fi

# apt output goes to a log shown only on failure, to stay quiet on success.
LOG="$(mktemp)"
trap 'rm -f "${LOG}"' EXIT
install() {
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >>"${LOG}" 2>&1
}
# Try the package lists as they are first; refresh them once if the packages are not found there.
if ! install; then
    if ! { "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >>"${LOG}" 2>&1 && install; }; then
        cat "${LOG}" >&2
        echo "install-chromium: apt-get could not install ${PACKAGES[*]}" >&2
        exit 1
    fi
fi

present || { echo "install-chromium: the install did not provide a working chromium and chromedriver" >&2; exit 1; }
echo "install-chromium: installed $(chromium --version 2>/dev/null | head -n1) and $(chromedriver --version | head -n1)"
