#!/usr/bin/env bash
# A Java runtime >= 17 for Spark preparation (data.engine=spark; pyspark 4 runs on Java 17+), brought by
# `make test` so a fresh Debian machine with only Python needs nothing installed by hand.
#   - java (JAVA_HOME/bin/java when JAVA_HOME is set, as pyspark reads it; else PATH) >= 17: nothing to do;
#   - otherwise, as root: apt-get update once, then apt-get install openjdk-17-jre-headless;
#   - otherwise: fail with one line saying what to install.
set -euo pipefail
MIN=${JAVA_MIN_VERSION:-17}
PACKAGE=openjdk-17-jre-headless

java_bin() {
  if [ -n "${JAVA_HOME:-}" ]; then echo "$JAVA_HOME/bin/java"; else command -v java || echo java; fi
}

# The first line of `java -version` mentioning a version, empty when java is missing or fails.
java_line() {
  local out
  out=$("$(java_bin)" -version 2>&1) || return 0
  grep -m1 'version "' <<<"$out" || true
}

# The major version of that line: "17.0.15" -> 17, "21" -> 21, "1.8.0_292" -> 8; 0 when unknown.
java_major() {
  local version major
  version=$(sed -nE 's/.*version "([^"]*)".*/\1/p' <<<"$1")
  major=${version%%[.+-]*}
  [ "$major" = 1 ] && major=$(cut -d. -f2 <<<"$version")
  [[ "$major" =~ ^[0-9]+$ ]] && echo "$major" || echo 0
}

line=$(java_line)
if [ "$(java_major "$line")" -ge "$MIN" ]; then
  echo "java: $line"
  exit 0
fi
found=${line:-no working java}
if [ -n "${JAVA_HOME:-}" ]; then  # pyspark starts JAVA_HOME's java: an installed package would not be used
  echo "error: Spark preparation needs Java $MIN+ and JAVA_HOME=$JAVA_HOME has $found;" \
       "point JAVA_HOME at a Java $MIN+ installation or unset it" >&2
  exit 1
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "error: Spark preparation needs Java $MIN+ (found: $found); install it:" \
       "sudo apt-get install -y --no-install-recommends $PACKAGE, or set JAVA_HOME to a Java $MIN+ installation" >&2
  exit 1
fi
echo "java: $found; installing $PACKAGE" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# The JRE's postinst links its man pages; slim images drop /usr/share/man, so make the folder first.
mkdir -p /usr/share/man/man1
apt-get install -y -qq --no-install-recommends "$PACKAGE" >/dev/null
hash -r
line=$(java_line)
if [ "$(java_major "$line")" -lt "$MIN" ]; then
  echo "error: installed $PACKAGE but $(java_bin) is still not Java $MIN+ (${line:-no working java});" \
       "put /usr/lib/jvm/java-17-openjdk-*/bin first on PATH" >&2
  exit 1
fi
echo "java: $line"
