#!/usr/bin/env bash
# The whole test suite: starts the local brokers it needs, then runs every
# crate's tests (unit, conformance against the real brokers, doc tests).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/brokers.sh
cargo test --workspace --all-features --no-fail-fast "$@"
