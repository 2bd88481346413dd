-- pgcache: everything at once: role, publication, control table and triggers, slot, then the
-- replica identity report.
--
--   psql -d app -v role=pgcache -v password='change me' -v publication=pgcache -v slot=pgcache \
--        -v tables='public.users,public.orders' -f sql/setup.sql
--
-- Postgres must already run with wal_level = logical (ALTER SYSTEM SET wal_level = logical;
-- then a restart). Every script is safe to run again.
\set ON_ERROR_STOP on
\ir role.sql
\ir publication.sql
\ir events.sql
\ir slot.sql
\ir replica_identity.sql
