#!/usr/bin/env bash
# redis-server for the tests of the shared online state (serve --state redis://...), brought by `make test`
# so a fresh Debian machine with only Python needs nothing installed by hand. The tests start their own
# servers on 127.0.0.1 with random ports; nothing here starts one.
#   - redis-server on PATH (or REDIS_SERVER naming one) >= 7: nothing to do;
#   - otherwise, as root: apt-get update once, then apt-get install redis-server (Debian's 7.x);
#   - otherwise: fail with one line saying what to install.
set -euo pipefail
MIN=${REDIS_MIN_VERSION:-7}
BIN=${REDIS_SERVER:-redis-server}

major() {
  local out
  out=$("$BIN" --version 2>/dev/null) || { echo 0; return; }
  sed -nE 's/.* v=([0-9]+)\..*/\1/p' <<<"$out" | grep -E '^[0-9]+$' || echo 0
}

if [ "$(major)" -ge "$MIN" ]; then
  echo "redis: $("$BIN" --version)"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "error: the shared-state tests need redis-server $MIN+ (found: $("$BIN" --version 2>/dev/null || echo none));" \
       "install it: sudo apt-get install -y --no-install-recommends redis-server" >&2
  exit 1
fi
echo "redis: none found; installing redis-server" >&2
export DEBIAN_FRONTEND=noninteractive
# One apt-get update per machine: tools/ensure_java.sh may have run it a moment ago.
if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mmin -60 2>/dev/null | head -1)" ]; then
  apt-get update -qq
fi
apt-get install -y -qq --no-install-recommends redis-server >/dev/null
# The package starts a system-wide server on 6379 where an init system runs; the tests use their own.
if command -v service >/dev/null; then service redis-server stop >/dev/null 2>&1 || true; fi
hash -r
if [ "$(major)" -lt "$MIN" ]; then
  echo "error: installed redis-server but $BIN --version is not $MIN+ ($("$BIN" --version 2>/dev/null || echo none))" >&2
  exit 1
fi
echo "redis: $("$BIN" --version)"
