-- pgcache: the publication listing the tables whose changes the daemon streams.
--
--   psql -v publication=pgcache -v tables='public.users,public.orders' -f sql/publication.sql
--
-- publish_via_partition_root makes changes to partitions arrive under the partitioned
-- table's name, so one rule covers every partition. Running it again replaces the table list
-- (keeping pgcache.events, the control table of sql/events.sql). On Postgres 18 and later it
-- also sets publish_generated_columns = none (the default): the backfill and the reader leave
-- generated columns out, so the stream must too.
\set ON_ERROR_STOP on
SELECT set_config('pgcache.publication', :'publication', false),
       set_config('pgcache.tables', :'tables', false) \g /dev/null

DO $$
DECLARE
  p text := current_setting('pgcache.publication');
  tables text := (SELECT string_agg(format('%s', btrim(t)), ', ')
                  FROM unnest(string_to_array(current_setting('pgcache.tables'), ',')) AS t);
BEGIN
  -- The control table (sql/events.sql) stays published when the list is replaced.
  IF to_regclass('pgcache.events') IS NOT NULL THEN
    tables := tables || ', pgcache.events';
  END IF;
  IF EXISTS (SELECT 1 FROM pg_publication WHERE pubname = p) THEN
    EXECUTE format('ALTER PUBLICATION %I SET TABLE %s', p, tables);
    EXECUTE format('ALTER PUBLICATION %I SET (publish = %L, publish_via_partition_root = true)',
                   p, 'insert, update, delete, truncate');
    IF current_setting('server_version_num')::int >= 180000 THEN
      EXECUTE format('ALTER PUBLICATION %I SET (publish_generated_columns = none)', p);
    END IF;
  ELSE
    EXECUTE format('CREATE PUBLICATION %I FOR TABLE %s WITH (publish = %L, publish_via_partition_root = true)',
                   p, tables, 'insert, update, delete, truncate');
  END IF;
END
$$;
