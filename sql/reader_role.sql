-- pgcache: the role the read helper (pgcache::Reader) connects as, set as [reader] url.
--
--   psql -v role=pgcache_reader -v password='change me' -v tables='public.users,public.orders' -f sql/reader_role.sql
--
-- A LOGIN role that may SELECT the cached tables and nothing else: no REPLICATION, no
-- superuser, no writes. Applications hold its password, so it must not be the daemon's role
-- (sql/role.sql), whose REPLICATION attribute reads every change to every table. The
-- catalogs the read helper consults (pg_attribute, pg_type) are readable by every role.
-- Running it again resets the password and adds grants for tables added to the list; it
-- never revokes (REVOKE SELECT ON ... FROM the role by hand for a table you stop caching).
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
    EXECUTE format('CREATE ROLE %I WITH LOGIN NOSUPERUSER NOREPLICATION NOCREATEDB NOCREATEROLE PASSWORD %L',
                   r, current_setting('pgcache.password'));
  ELSE
    EXECUTE format('ALTER ROLE %I WITH LOGIN NOSUPERUSER NOREPLICATION NOCREATEDB NOCREATEROLE PASSWORD %L',
                   r, current_setting('pgcache.password'));
  END IF;
  EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), r);
  FOREACH t IN ARRAY string_to_array(current_setting('pgcache.tables'), ',') LOOP
    t := btrim(t);
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', coalesce((parse_ident(t))[array_length(parse_ident(t), 1) - 1], 'public'), r);
    EXECUTE format('GRANT SELECT ON TABLE %s TO %I', t, r);
  END LOOP;
END
$$;
