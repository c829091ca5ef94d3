#!/usr/bin/env bash
# Regenerate the CPU lock files from the top-level requirements (*.in) with pip-compile.
#   make lock          (runs this script with a throwaway pip-tools environment)
# torch resolves to the CPU build found through --find-links (PIP_FIND_LINKS, default /opt/wheels);
# its local label (+cpu) is dropped so the pin reads torch==2.13.0 on every machine.
# dev-lock.txt keeps only what lock.txt does not already pin, so `pip install -r lock.txt -r dev-lock.txt`
# never sees two pins of one package.
set -euo pipefail
cd "$(dirname "$0")"
COMPILE=${LOCK_COMPILER:-pip-compile}
FIND_LINKS=${PIP_FIND_LINKS:-/opt/wheels}
ARGS=(-q --strip-extras --no-header --no-annotate --allow-unsafe --no-emit-index-url --no-emit-find-links
      --find-links "$FIND_LINKS")
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# pip-compile keeps the pins already in its output file where they still satisfy the *.in files, so
# adding a requirement adds its own pins and moves nothing else (delete lock.txt to take upgrades).
[ -f lock.txt ] && grep -E '^[A-Za-z0-9]' lock.txt > "$tmp/lock.txt"
[ -f lock.txt ] && cat "$tmp/lock.txt" > "$tmp/dev-full.txt" && grep -E '^[A-Za-z0-9]' dev-lock.txt >> "$tmp/dev-full.txt"

"$COMPILE" "${ARGS[@]}" runtime.in -o "$tmp/lock.txt"
{
  echo "# Pinned runtime environment of recforge (Python 3.11, CPU torch). Generated from runtime.in by"
  echo "# requirements/compile.sh (make lock); do not edit by hand."
  sed -E 's/^(torch==[0-9.]+)\+cpu$/\1/' "$tmp/lock.txt"
} > lock.txt.new && mv lock.txt.new lock.txt

"$COMPILE" "${ARGS[@]}" dev.in -o "$tmp/dev-full.txt"
{
  echo "# Pinned test/lint tools, installed on top of lock.txt by \`make test\`. Generated from dev.in by"
  echo "# requirements/compile.sh (make lock); do not edit by hand."
  grep -vxF -f <(grep -E '^[A-Za-z0-9]' lock.txt) "$tmp/dev-full.txt" | grep -E '^[A-Za-z0-9]' || true
} > dev-lock.txt.new && mv dev-lock.txt.new dev-lock.txt
echo "wrote requirements/lock.txt ($(grep -c '==' lock.txt) pins) and requirements/dev-lock.txt ($(grep -c '==' dev-lock.txt) pins)"
