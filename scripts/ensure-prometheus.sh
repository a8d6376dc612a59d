#!/usr/bin/env bash
# Make sure a prometheus binary exists (the monitoring test starts its own server on a
# free port); install Debian's package if not.
set -euo pipefail
if command -v prometheus >/dev/null; then exit 0; fi
echo "prometheus not found; installing it from the OS packages" >&2
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
if command -v apt-get >/dev/null; then
  # Quiet unless it fails: then apt's output is shown.
  log=$(mktemp)
  trap 'rm -f "$log"' EXIT
  # No recommends: they bring prometheus-node-exporter, another service (on port 9100).
  if ! { $SUDO apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus; } >"$log" 2>&1; then
    cat "$log" >&2
    exit 1
  fi
else
  echo "no apt-get: install Prometheus (>= 2.28, for http_sd_configs) yourself and put prometheus on PATH" >&2
  exit 1
fi
# Debian starts the packaged service (on port 9090, scraping nothing of ours). The project
# runs its own servers on its own ports and config, so the system one is stopped and
# disabled: it was installed just now, by us.
if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
elif command -v service >/dev/null; then
  $SUDO service prometheus stop >/dev/null 2>&1 || true
  $SUDO update-rc.d prometheus disable >/dev/null 2>&1 || true
fi
command -v prometheus >/dev/null
