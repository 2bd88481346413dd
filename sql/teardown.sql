-- pgcache: remove the slot, the publication and the control schema (and optionally the role).
--
--   psql -v slot=pgcache -v publication=pgcache -f sql/teardown.sql
--
-- Do this when you stop running pgcache: a slot that nobody consumes keeps every WAL segment
-- from its position on, and the disk fills. Stop the daemon first (an active slot cannot be
-- dropped). To drop the role as well: DROP OWNED BY pgcache; DROP ROLE pgcache;
\set ON_ERROR_STOP on
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = :'slot';
SELECT set_config('pgcache.publication', :'publication', false) \g /dev/null
DO $$
BEGIN
  EXECUTE format('DROP PUBLICATION IF EXISTS %I', current_setting('pgcache.publication'));
END
$$;
-- The control table, its triggers and functions (sql/events.sql).
DROP EVENT TRIGGER IF EXISTS pgcache_ddl;
DROP EVENT TRIGGER IF EXISTS pgcache_drop;
DROP EVENT TRIGGER IF EXISTS pgcache_rewrite;
DROP EVENT TRIGGER IF EXISTS pgcache_type;
DROP EVENT TRIGGER IF EXISTS pgcache_publication;
DROP SCHEMA IF EXISTS pgcache CASCADE;
