#!/usr/bin/env bash
# Makes sure the brokers the test suite talks to are running on 127.0.0.1:
# Redis 6379, RabbitMQ 5672, NATS (JetStream) 4222, PostgreSQL 5432 (trust
# authentication for `postgres`, a database `test`). Starts what is down and
# installs from Debian's packages what is missing. Fails loudly otherwise.
set -euo pipefail

log() { printf 'brokers: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # name, seconds, command...
  local name=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
  log "$name is up"
}

apt_updated=""
install() { # package
  command -v apt-get >/dev/null || die "$1 is missing and apt-get is not available: install $1 by hand"
  if [ -z "$apt_updated" ]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    apt_updated=1
  fi
  log "installing $1"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null \
    || die "could not install $1 (apt-get install $1)"
}

ensure_redis() {
  if port_open 6379; then log "redis is up"; return; fi
  command -v redis-server >/dev/null || install redis-server
  log "starting redis-server"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp --logfile /tmp/tidings-redis.log
  wait_for redis 20 redis-cli -h 127.0.0.1 -p 6379 ping \
    || die "redis did not start: see /tmp/tidings-redis.log; start it with: redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no"
}

ensure_rabbitmq() {
  if port_open 5672; then log "rabbitmq is up"; return; fi
  command -v rabbitmq-server >/dev/null || install rabbitmq-server
  log "starting rabbitmq-server"
  RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 ERL_EPMD_ADDRESS=127.0.0.1 rabbitmq-server -detached \
    || die "rabbitmq-server -detached failed"
  # await_startup fails if called before the node registered with epmd: poll the port instead.
  wait_for rabbitmq 120 port_open 5672 \
    || die "rabbitmq did not open 5672 within 120 s: see /var/log/rabbitmq; start it with: rabbitmq-server -detached"
  wait_for rabbitmq-app 60 rabbitmq-diagnostics -q check_port_connectivity \
    || die "rabbitmq is not serving AMQP: see /var/log/rabbitmq"
}

ensure_nats() {
  if port_open 4222; then log "nats is up"; return; fi
  command -v nats-server >/dev/null || install nats-server
  log "starting nats-server with JetStream"
  mkdir -p /tmp/tidings-nats
  nohup nats-server -a 127.0.0.1 -p 4222 -js -sd /tmp/tidings-nats >/tmp/tidings-nats.log 2>&1 &
  wait_for nats 20 port_open 4222 \
    || die "nats did not start: see /tmp/tidings-nats.log; start it with: nats-server -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server"
}

pg_ready() { psql -h 127.0.0.1 -U postgres -d postgres -Atqc 'select 1' ; }

ensure_postgres() {
  command -v psql >/dev/null || install postgresql-client
  if ! port_open 5432; then
    command -v pg_ctlcluster >/dev/null || install postgresql
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    [ -n "$version" ] || die "postgresql is installed but has no cluster: pg_createcluster <version> main"
    log "starting postgresql $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start \
      || die "pg_ctlcluster $version main start failed: see /var/log/postgresql"
    wait_for postgres 60 port_open 5432 \
      || die "postgresql did not open 5432: see /var/log/postgresql"
  fi
  if ! pg_ready >/dev/null 2>&1; then
    # A fresh Debian cluster asks for passwords over TCP: the tests connect
    # as postgres without one (trust on loopback, as on the CI machines).
    local hba
    hba=$(runuser -u postgres -- psql -Atqc 'show hba_file' 2>/dev/null) \
      || die "cannot reach postgresql as postgres over its socket; let postgres connect from 127.0.0.1 without a password"
    log "trusting loopback connections in $hba"
    sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
    runuser -u postgres -- psql -Atqc 'select pg_reload_conf()' >/dev/null
    wait_for postgres-login 20 pg_ready \
      || die "postgres cannot log in over 127.0.0.1 without a password: set its pg_hba.conf lines for 127.0.0.1 to trust"
  fi
  if [ "$(psql -h 127.0.0.1 -U postgres -d postgres -Atqc "select 1 from pg_database where datname = 'test'")" != 1 ]; then
    log "creating database test"
    psql -h 127.0.0.1 -U postgres -d postgres -qc 'create database test' \
      || die "could not create the database test"
  fi
  log "postgres is up"
}

ensure_redis
ensure_rabbitmq
ensure_nats
ensure_postgres
