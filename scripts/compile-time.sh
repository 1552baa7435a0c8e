#!/usr/bin/env bash
# Incremental compile time of a user crate with 20 handlers (issue 19):
# generates the crate in a temporary directory (tidings as a path
# dependency), builds it once, then times a rebuild after editing one
# handler's body. Usage: scripts/compile-time.sh [target-dir]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=$(mktemp -d)
target=${1:-$dir/target}
mkdir -p "$dir/src"
cat > "$dir/Cargo.toml" <<TOML
[package]
name = "handlers20"
version = "0.1.0"
edition = "2024"

[dependencies]
tidings = { path = "$root" }
tokio = { version = "1", features = ["full"] }
serde = { version = "1", features = ["derive"] }

[workspace]
TOML
{
  echo 'use std::sync::Arc;'
  echo 'use serde::{Deserialize, Serialize};'
  echo 'use tidings::extract::{Attempt, Meta};'
  echo 'use tidings::prelude::*;'
  echo '#[derive(Clone)] struct Db(Arc<str>);'
  for i in $(seq 0 19); do
    echo "#[derive(Serialize, Deserialize)] struct E$i { id: u64, name: String }"
    echo "impl EventType for E$i { const TYPE: &'static str = \"e$i\"; }"
    echo "async fn h$i(e: Event<E$i>, State(db): State<Db>, meta: Meta, Attempt(a): Attempt) -> HandlerResult { let _ = (e.data.id, &e.data.name, db.0.len(), &meta.id, a); Ok(()) }"
  done
  echo '#[tokio::main] async fn main() -> tidings::Result<()> {'
  echo '  let bus = tidings::connect("memory://").await?;'
  echo '  let c = bus.consumer("g").state(Db("x".into()))'
  for i in $(seq 0 19); do echo "    .on::<E$i, _, _>(\"t$((i % 4))\", h$i)"; done
  echo '    .start().await?;'
  echo '  c.shutdown(std::time::Duration::from_secs(1)).await;'
  echo '  Ok(())'
  echo '}'
} > "$dir/src/main.rs"
cd "$dir"
CARGO_TARGET_DIR=$target cargo build --quiet
sed -i 's/async fn h3(e: Event<E3>, State(db): State<Db>, meta: Meta, Attempt(a): Attempt) -> HandlerResult { /&if e.data.id == 9 { return Err(HandlerError::permanent("nine")); } /' src/main.rs
start=$(date +%s.%N)
CARGO_TARGET_DIR=$target cargo build --quiet
end=$(date +%s.%N)
echo "incremental rebuild after editing one of 20 handlers: $(echo "$end - $start" | bc) s"
rm -rf "$dir"
