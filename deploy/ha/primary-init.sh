#!/usr/bin/env bash
# Primary init script (deploy/ha/compose.yaml mounts it into /docker-entrypoint-initdb.d,
# after ../compose/initdb.sh has made the demo table and run sql/setup.sql). It prepares the
# primary for a standby with failover slots:
#
# 1. a replication role for the standby, and pg_hba.conf lines that let it stream;
# 2. the physical slot `standby1` the standby streams through (its primary_slot_name);
# 3. synchronized_standby_slots = 'standby1': logical walsenders (pgcache's) send nothing that
#    the standby has not received, so after a promotion Redis holds nothing the new primary
#    lacks.
set -Eeo pipefail

psql_app=(psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB")

"${psql_app[@]}" -v password="${REPLICATOR_PASSWORD:-replicator}" <<'SQL'
SELECT set_config('ha.password', :'password', false) \g /dev/null
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'replicator') THEN
    EXECUTE format('CREATE ROLE replicator LOGIN REPLICATION PASSWORD %L', current_setting('ha.password'));
  END IF;
END
$$;
-- The slot synchronization worker reads the slots in the database named in the standby's
-- primary_conninfo.
GRANT CONNECT ON DATABASE app TO replicator;
SELECT pg_create_physical_replication_slot('standby1')
 WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'standby1');
ALTER SYSTEM SET synchronized_standby_slots = 'standby1';
SQL

cat >> "$PGDATA/pg_hba.conf" <<'HBA'
host replication replicator all scram-sha-256
host app         replicator all scram-sha-256
HBA
