#!/usr/bin/env bash
# Start a throw-away PostgreSQL server for the sweep storage tests and print its URL.
#   export FINETUNE_TEST_POSTGRES_URL=$(bash scripts/start_postgres.sh)
# Installs Debian's postgresql package when missing. The server refuses to run as root, so as
# root it runs as the postgres user. Data lives in $PGDATA_DIR (default /tmp/finetune-pg).
set -euo pipefail
PORT="${FINETUNE_PG_PORT:-54329}"
DATA="${PGDATA_DIR:-/tmp/finetune-pg}"
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >&2
fi
BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
if [ "$(id -u)" = 0 ]; then AS="runuser -u postgres --"; else AS=""; fi
if [ ! -f "$DATA/PG_VERSION" ]; then
    mkdir -p "$DATA"
    if [ -n "$AS" ]; then chown postgres "$DATA"; fi
    $AS "$BIN/initdb" -D "$DATA" -A trust -U postgres >&2
fi
if ! $AS "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    $AS "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -o "-p $PORT -k /tmp -c listen_addresses=127.0.0.1" -w start >&2
fi
"$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='finetune_test'" \
    | grep -q 1 || "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres finetune_test
echo "postgresql://postgres@127.0.0.1:$PORT/finetune_test"
