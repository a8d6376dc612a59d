#!/usr/bin/env bash
# Make sure a redis-server binary exists; install it from the OS packages if not.
set -euo pipefail
if command -v redis-server >/dev/null; then exit 0; fi
echo "redis-server not found; installing it from the OS packages" >&2
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
if command -v apt-get >/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
else
  echo "no apt-get: install Redis (>= 6) yourself and put redis-server on PATH" >&2
  exit 1
fi
# Debian starts the packaged service; the project runs its own servers on its own ports.
command -v redis-server >/dev/null
