#!/usr/bin/env bash
# The whole test suite: starts the local brokers it needs, then runs every
# crate's tests (unit, conformance against the real brokers, cross-broker
# tests, doc tests). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# The Kafka adapter builds librdkafka from source.
if ! command -v cc >/dev/null || ! command -v c++ >/dev/null || ! command -v make >/dev/null; then
  echo "test: installing a C/C++ toolchain for librdkafka (build-essential)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential >/dev/null \
    || { echo "test: ERROR: could not install build-essential (gcc, g++, make)" >&2; exit 1; }
fi

scripts/brokers.sh
cargo test --workspace --all-features --no-fail-fast "$@"
