#!/usr/bin/env bash
# Standby entrypoint (deploy/ha/compose.yaml). On the first start, copies the primary with
# pg_basebackup through the physical slot `standby1` and configures a hot standby that keeps
# synchronized copies of failover slots (Postgres 17+):
#
#   primary_conninfo with dbname   the slot synchronization worker connects to that database
#   primary_slot_name = standby1   slots are synchronized only through a physical slot
#   hot_standby_feedback = on      the primary keeps the catalog rows the copies still need
#   sync_replication_slots = on    the worker that copies the primary's failover slots
#   synchronized_standby_slots = '' pg_basebackup copied the primary's 'standby1', a slot
#                                  that does not exist here: once promoted, this server
#                                  would hold pgcache's stream back waiting for it
#
# Then it runs Postgres as the image's entrypoint would.
set -Eeo pipefail

: "${PGDATA:?}" "${PRIMARY_HOST:?}" "${REPLICATOR_PASSWORD:?}"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  mkdir -p "$PGDATA"
  chown postgres:postgres "$PGDATA"
  chmod 700 "$PGDATA"
  until gosu postgres env PGPASSWORD="$REPLICATOR_PASSWORD" \
      pg_basebackup -h "$PRIMARY_HOST" -U replicator -D "$PGDATA" -X stream -S standby1 \
      --checkpoint=fast; do
    echo "waiting for the primary..." >&2
    rm -rf "${PGDATA:?}"/*
    sleep 2
  done
  gosu postgres touch "$PGDATA/standby.signal"
  gosu postgres tee -a "$PGDATA/postgresql.auto.conf" >/dev/null <<CONF
primary_conninfo = 'host=$PRIMARY_HOST port=5432 user=replicator password=$REPLICATOR_PASSWORD dbname=app application_name=standby1'
primary_slot_name = 'standby1'
hot_standby_feedback = on
sync_replication_slots = on
synchronized_standby_slots = ''
CONF
fi

exec docker-entrypoint.sh postgres -c wal_level=logical -c max_slot_wal_keep_size=4GB
