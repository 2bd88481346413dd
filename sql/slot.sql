-- pgcache: the logical replication slot the daemon consumes (plugin pgoutput).
--
--   psql -v slot=pgcache -f sql/slot.sql
--
-- A slot keeps WAL until its consumer confirms it. A slot nobody reads pins WAL forever:
-- drop it with sql/teardown.sql when you stop using pgcache, and consider
-- max_slot_wal_keep_size as a safety net.
--
-- From Postgres 17 the slot is a failover slot (failover = true): a standby with
-- sync_replication_slots = on keeps a copy of it, so that pgcache resumes from that copy
-- after the standby is promoted. On Postgres 15 and 16 a promotion loses the slot (see
-- README, "High availability").
\set ON_ERROR_STOP on
SELECT current_setting('server_version_num')::int >= 170000 AS pgcache_failover_slots,
       EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = :'slot') AS pgcache_slot_exists
\gset
\if :pgcache_slot_exists
SELECT 'slot ' || :'slot' || ' already exists' AS result;
\elif :pgcache_failover_slots
SELECT 'created slot ' || slot_name || ' at ' || lsn || ' (a failover slot)' AS result
  FROM pg_create_logical_replication_slot(:'slot', 'pgoutput', false, false, true);
\else
SELECT 'created slot ' || slot_name || ' at ' || lsn AS result
  FROM pg_create_logical_replication_slot(:'slot', 'pgoutput');
\endif
