-- pgcache: the role the daemon connects as.
--
--   psql -v role=pgcache -v password='change me' -v tables='public.users,public.orders' -f sql/role.sql
--
-- It gets LOGIN, REPLICATION, and SELECT on the cached tables (for backfills); no other grant.
-- But REPLICATION is far more than "stream our slot": logical decoding does not check table
-- privileges, so this role can create a slot of its own with the test_decoding plugin and
-- read every change to every table of every database it may connect to, tables it cannot
-- SELECT included; where pg_hba.conf allows physical replication connections it can also
-- copy the whole cluster with pg_basebackup. Treat its password as read access to all data:
-- give it to the daemon only. Applications that use the read helper get their own role,
-- with SELECT on the cached tables only: sql/reader_role.sql.
\set ON_ERROR_STOP on
SELECT set_config('pgcache.role', :'role', false),
       set_config('pgcache.password', :'password', false),
       set_config('pgcache.tables', :'tables', false) \g /dev/null

DO $$
DECLARE
  r text := current_setting('pgcache.role');
  t text;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
    EXECUTE format('CREATE ROLE %I WITH LOGIN REPLICATION PASSWORD %L', r, current_setting('pgcache.password'));
  ELSE
    EXECUTE format('ALTER ROLE %I WITH LOGIN REPLICATION PASSWORD %L', r, current_setting('pgcache.password'));
  END IF;
  EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), r);
  FOREACH t IN ARRAY string_to_array(current_setting('pgcache.tables'), ',') LOOP
    t := btrim(t);
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', coalesce((parse_ident(t))[array_length(parse_ident(t), 1) - 1], 'public'), r);
    EXECUTE format('GRANT SELECT ON TABLE %s TO %I', t, r);
  END LOOP;
END
$$;
