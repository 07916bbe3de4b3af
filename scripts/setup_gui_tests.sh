#!/usr/bin/env bash
# What the GUI's browser tests need beyond pip: a Chromium (Debian's) for Playwright to drive.
# Idempotent. Playwright's own browser download is never used (tests pass executable_path).
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 ||
      echo "WARNING: could not install chromium; the GUI browser tests will fail under CI=true" >&2
  else
    echo "WARNING: chromium not found (install it: apt-get install chromium); GUI browser tests need it" >&2
  fi
fi
