#!/usr/bin/env bash
# The whole test suite: starts the local brokers it needs, then runs every
# crate's tests (unit, conformance against the real brokers, cross-broker
# tests, doc tests). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# The Kafka adapter builds librdkafka from source, with OpenSSL for TLS;
# servers the tests start run under util-linux's setpriv, so they die with
# the test process however it ends.
missing=()
command -v cc >/dev/null && command -v c++ >/dev/null && command -v make >/dev/null \
  || missing+=(build-essential)
command -v pkg-config >/dev/null || missing+=(pkg-config)
pkg-config --exists openssl 2>/dev/null || missing+=(libssl-dev)
[[ -x /usr/bin/setpriv ]] || missing+=(util-linux)
if ((${#missing[@]})); then
  echo "test: installing ${missing[*]} (librdkafka's build; setpriv)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
    || { echo "test: ERROR: could not install ${missing[*]} (apt-get install ${missing[*]})" >&2; exit 1; }
fi

scripts/brokers.sh

# The interop tests run plain Node.js services (tests/node) against Tidings.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "test: installing nodejs and npm for the Node.js interop peers" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null \
    || { echo "test: ERROR: could not install Node.js (apt-get install nodejs npm)" >&2; exit 1; }
fi
npm ci --prefix tests/node --no-audit --no-fund --loglevel=error >/dev/null \
  || { echo "test: ERROR: npm ci in tests/node failed (needs the npm registry; see tests/node/package-lock.json)" >&2; exit 1; }

cargo test --workspace --all-features --no-fail-fast "$@"
