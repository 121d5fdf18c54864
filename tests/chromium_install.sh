#!/bin/sh
# Installs headless Chromium and its driver for tests/test_annotate.py's browser test (root on Debian).
# Idempotent: does nothing when both are present. Never fails: without them that test skips and says why.
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || [ ! -f /etc/debian_version ]; then
    echo "tests/chromium_install.sh: installing Chromium needs root on Debian; the browser test will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; then
    echo "tests/chromium_install.sh: installed $(chromium --version)"
else
    echo "tests/chromium_install.sh: apt-get could not install chromium chromium-driver; the browser test will skip" >&2
fi
