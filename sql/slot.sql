-- pgcache: the logical replication slot the daemon consumes (plugin pgoutput).
--
--   psql -v slot=pgcache -f sql/slot.sql
--
-- A slot keeps WAL until its consumer confirms it. A slot nobody reads pins WAL forever:
-- drop it with sql/teardown.sql when you stop using pgcache, and consider
-- max_slot_wal_keep_size as a safety net.
\set ON_ERROR_STOP on
SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = :'slot')
            THEN 'slot ' || :'slot' || ' already exists'
            ELSE (SELECT 'created slot ' || slot_name || ' at ' || lsn
                  FROM pg_create_logical_replication_slot(:'slot', 'pgoutput'))
       END AS result;
