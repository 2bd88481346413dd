-- pgcache: the control table, and the triggers that report what the WAL does not show.
--
--   psql -v role=pgcache -v publication=pgcache -f sql/events.sql
--
-- Backfill watermarks, `pgcache resync` requests and partition events reach the daemon as
-- rows inserted into pgcache.events: they travel in the replication stream, in commit order.
-- Only the daemon's role and the SECURITY DEFINER functions below may insert, so no other
-- role can forge a control event. (The daemon does not read logical messages at all: any
-- role can call pg_logical_emit_message, so nothing it says can be trusted.)
--
-- With publish_via_partition_root, a TRUNCATE of one partition is not published, and a
-- DETACH or DROP of a partition removes its rows without any row change in the WAL. The
-- triggers here turn those into events: a statement-level TRUNCATE trigger on every
-- partition of a published partitioned table, and event triggers on ALTER TABLE, CREATE
-- TABLE and DROP. The daemon then deletes the keys whose rows are gone (and, after an
-- ATTACH, backfills). Run this as a superuser (event triggers need one); safe to run again.
\set ON_ERROR_STOP on
SELECT set_config('pgcache.role', :'role', false),
       set_config('pgcache.publication', :'publication', false) \g /dev/null

CREATE SCHEMA IF NOT EXISTS pgcache;
REVOKE ALL ON SCHEMA pgcache FROM PUBLIC;

CREATE TABLE IF NOT EXISTS pgcache.events (
  id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  kind text NOT NULL,
  arg  text NOT NULL DEFAULT '',
  at   timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON TABLE pgcache.events FROM PUBLIC;

-- Which published partitioned table each partition belongs to, so that a DROP (whose
-- catalog rows are gone by the time the event trigger runs) can still be traced to it.
CREATE TABLE IF NOT EXISTS pgcache.partitions (
  relid oid PRIMARY KEY,
  root  text NOT NULL
);
REVOKE ALL ON TABLE pgcache.partitions FROM PUBLIC;

-- The columns each published table had at the last DDL the triggers saw: an ALTER TABLE
-- that changes them without a row change in the WAL (ADD COLUMN ... DEFAULT fills every
-- row at once) is reported as a resync.
CREATE TABLE IF NOT EXISTS pgcache.columns (
  relid   oid PRIMARY KEY,
  columns text NOT NULL
);
-- And its name (schema.name): an ALTER TABLE that renames it, or moves it to another schema,
-- is reported as a check, since the table under the old name may be gone or another one.
ALTER TABLE pgcache.columns ADD COLUMN IF NOT EXISTS name text;
REVOKE ALL ON TABLE pgcache.columns FROM PUBLIC;

-- The publication whose partitioned tables the triggers watch.
CREATE TABLE IF NOT EXISTS pgcache.settings (
  name  text PRIMARY KEY,
  value text NOT NULL
);
REVOKE ALL ON TABLE pgcache.settings FROM PUBLIC;
INSERT INTO pgcache.settings VALUES ('publication', current_setting('pgcache.publication'))
  ON CONFLICT (name) DO UPDATE SET value = excluded.value;

DO $$
DECLARE
  r text := current_setting('pgcache.role');
  p text := current_setting('pgcache.publication');
BEGIN
  EXECUTE format('GRANT USAGE ON SCHEMA pgcache TO %I', r);
  -- INSERT for watermarks and resync requests, SELECT for INSERT ... RETURNING, DELETE to
  -- prune old events. Nothing else, and nobody else.
  EXECUTE format('GRANT SELECT, INSERT, DELETE ON TABLE pgcache.events TO %I', r);
  IF EXISTS (SELECT 1 FROM pg_publication WHERE pubname = p AND NOT puballtables)
     AND NOT EXISTS (SELECT 1 FROM pg_publication_tables
                      WHERE pubname = p AND schemaname = 'pgcache' AND tablename = 'events') THEN
    EXECUTE format('ALTER PUBLICATION %I ADD TABLE pgcache.events', p);
  END IF;
END
$$;

-- Records an event; the only way roles other than the daemon's can reach pgcache.events.
CREATE OR REPLACE FUNCTION pgcache.emit(kind text, arg text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  INSERT INTO pgcache.events (kind, arg) VALUES (kind, arg);
$$;
REVOKE ALL ON FUNCTION pgcache.emit(text, text) FROM PUBLIC;

-- Is this table a partitioned table (or a partition of one) that the publication carries?
-- Returns the published root as schema.name, or NULL.
CREATE OR REPLACE FUNCTION pgcache.published_root(rel oid) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT format('%s.%s', n.nspname, c.relname)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE c.oid = pg_partition_root(rel)
     AND c.relkind = 'p'
     AND EXISTS (SELECT 1 FROM pg_publication_tables t
                  WHERE t.pubname = (SELECT value FROM pgcache.settings WHERE name = 'publication')
                    AND t.schemaname = n.nspname AND t.tablename = c.relname);
$$;
REVOKE ALL ON FUNCTION pgcache.published_root(oid) FROM PUBLIC;

-- A table the publication carries (itself, or as the root of its partition tree), as
-- schema.name, or NULL.
CREATE OR REPLACE FUNCTION pgcache.published_table(rel oid) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT format('%s.%s', n.nspname, c.relname)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE c.oid = coalesce(pg_partition_root(rel), rel)
     AND c.relkind IN ('r', 'p')
     AND EXISTS (SELECT 1 FROM pg_publication_tables t
                  WHERE t.pubname = (SELECT value FROM pgcache.settings WHERE name = 'publication')
                    AND t.schemaname = n.nspname AND t.tablename = c.relname);
$$;
REVOKE ALL ON FUNCTION pgcache.published_table(oid) FROM PUBLIC;

-- The columns of a table as name:type:modifier, in order: what its cached values hold.
CREATE OR REPLACE FUNCTION pgcache.columns_of(rel oid) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT coalesce(string_agg(format('%s:%s:%s', attname, atttypid, atttypmod), ',' ORDER BY attnum), '')
    FROM pg_attribute WHERE attrelid = rel AND attnum > 0 AND NOT attisdropped;
$$;
REVOKE ALL ON FUNCTION pgcache.columns_of(oid) FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgcache.on_partition_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  published text := pgcache.published_root(TG_RELID);
BEGIN
  IF published IS NOT NULL THEN
    PERFORM pgcache.emit('reconcile', published);
  END IF;
  RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION pgcache.on_partition_truncate() FROM PUBLIC;

-- Puts the TRUNCATE trigger on every partition of `root_oid` and records each partition.
-- Returns the partitions that were not recorded before (attached or created since).
CREATE OR REPLACE FUNCTION pgcache.watch_partitions(root_oid oid) RETURNS SETOF oid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  published text := pgcache.published_root(root_oid);
  part record;
BEGIN
  IF published IS NULL THEN
    RETURN;
  END IF;
  FOR part IN SELECT t.relid, c.relkind, format('%I.%I', n.nspname, c.relname) AS name
                FROM pg_partition_tree(root_oid) t
                JOIN pg_class c ON c.oid = t.relid
                JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE t.relid <> root_oid LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                    WHERE tgrelid = part.relid AND tgname = 'pgcache_partition_truncate') THEN
      EXECUTE format('CREATE TRIGGER pgcache_partition_truncate AFTER TRUNCATE ON %s '
                     'FOR EACH STATEMENT EXECUTE FUNCTION pgcache.on_partition_truncate()',
                     part.name);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgcache.partitions WHERE relid = part.relid) THEN
      INSERT INTO pgcache.partitions VALUES (part.relid, published);
      RETURN NEXT part.relid;
    END IF;
  END LOOP;
END
$$;
REVOKE ALL ON FUNCTION pgcache.watch_partitions(oid) FROM PUBLIC;

-- After CREATE TABLE / ALTER TABLE: a partition created empty needs only the trigger; one
-- attached brings rows (mirror tables backfill); one detached takes its rows away.
CREATE OR REPLACE FUNCTION pgcache.on_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  cmd record;
  root_oid oid;
  published text;
  added oid;
  gone record;
BEGIN
  FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands()
              WHERE object_type IN ('table', 'table column') LOOP
    CONTINUE WHEN NOT EXISTS (SELECT 1 FROM pg_class WHERE oid = cmd.objid);
    -- Columns changed under a published table, with no row change in the WAL: every
    -- cached value is in the old shape until its row changes.
    published := pgcache.published_table(cmd.objid);
    IF published IS NOT NULL AND cmd.command_tag = 'ALTER TABLE' THEN
      DECLARE
        now_columns text := pgcache.columns_of(coalesce(pg_partition_root(cmd.objid), cmd.objid));
        was text;
        was_name text;
        known boolean;
      BEGIN
        SELECT c.columns, c.name, true INTO was, was_name, known FROM pgcache.columns c
         WHERE c.relid = coalesce(pg_partition_root(cmd.objid), cmd.objid);
        INSERT INTO pgcache.columns VALUES (coalesce(pg_partition_root(cmd.objid), cmd.objid), now_columns, published)
          ON CONFLICT (relid) DO UPDATE SET columns = excluded.columns, name = excluded.name;
        IF was IS DISTINCT FROM now_columns THEN
          -- Unknown before (published after this script ran): changed, to be safe.
          PERFORM pgcache.emit('resync', published);
        END IF;
        IF was_name IS DISTINCT FROM published THEN
          -- Renamed or moved: is the table under the old name still the one cached? Its old
          -- name unknown, every cached table is checked.
          PERFORM pgcache.emit('check', CASE WHEN known AND was_name IS NOT NULL
                                             THEN was_name ELSE '*' END);
        END IF;
      END;
    END IF;
    root_oid := pg_partition_root(cmd.objid);
    published := pgcache.published_root(root_oid);
    CONTINUE WHEN published IS NULL;
    FOR added IN SELECT * FROM pgcache.watch_partitions(root_oid) LOOP
      -- CREATE TABLE ... PARTITION OF makes an empty partition: nothing to load.
      IF NOT (cmd.command_tag = 'CREATE TABLE' AND cmd.objid = added) THEN
        PERFORM pgcache.emit('resync', published);
      END IF;
    END LOOP;
    FOR gone IN SELECT p.relid FROM pgcache.partitions p
                 WHERE p.root = published
                   AND NOT EXISTS (SELECT 1 FROM pg_partition_tree(root_oid) t WHERE t.relid = p.relid) LOOP
      DELETE FROM pgcache.partitions WHERE relid = gone.relid;
      PERFORM pgcache.emit('reconcile', published);
    END LOOP;
  END LOOP;
END
$$;
REVOKE ALL ON FUNCTION pgcache.on_ddl() FROM PUBLIC;

-- After DROP: a dropped partition took its rows with it, and a dropped table may be one
-- the daemon caches (its rows gone with no row change in the WAL, perhaps replaced by a
-- table outside the publication): the daemon checks the name.
CREATE OR REPLACE FUNCTION pgcache.on_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  dropped record;
  published text;
BEGIN
  FOR dropped IN SELECT objid, schema_name, object_name FROM pg_event_trigger_dropped_objects()
                  WHERE object_type = 'table' AND NOT is_temporary LOOP
    DELETE FROM pgcache.partitions p WHERE p.relid = dropped.objid RETURNING p.root INTO published;
    IF published IS NOT NULL THEN
      PERFORM pgcache.emit('reconcile', published);
    END IF;
    DELETE FROM pgcache.columns c WHERE c.relid = dropped.objid;
    -- (pgcache's own tables: the events table may be the one going.)
    IF dropped.schema_name <> 'pgcache' THEN
      PERFORM pgcache.emit('check', format('%s.%s', dropped.schema_name, dropped.object_name));
    END IF;
  END LOOP;
END
$$;
REVOKE ALL ON FUNCTION pgcache.on_drop() FROM PUBLIC;

DROP EVENT TRIGGER IF EXISTS pgcache_ddl;
CREATE EVENT TRIGGER pgcache_ddl ON ddl_command_end
  WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE') EXECUTE FUNCTION pgcache.on_ddl();
-- A table rewritten by ALTER TABLE (ALTER COLUMN ... TYPE ... USING, among others) has new
-- values in every row, and none of them is a row change in the WAL.
CREATE OR REPLACE FUNCTION pgcache.on_rewrite() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  published text := pgcache.published_table(pg_event_trigger_table_rewrite_oid());
BEGIN
  IF published IS NOT NULL THEN
    PERFORM pgcache.emit('resync', published);
  END IF;
END
$$;
REVOKE ALL ON FUNCTION pgcache.on_rewrite() FROM PUBLIC;

DROP EVENT TRIGGER IF EXISTS pgcache_rewrite;
CREATE EVENT TRIGGER pgcache_rewrite ON table_rewrite
  WHEN TAG IN ('ALTER TABLE') EXECUTE FUNCTION pgcache.on_rewrite();

-- ALTER TYPE (an enum value renamed, say) changes how existing values read, with no row
-- change in the WAL: every published table with a column of that type is resynced.
CREATE OR REPLACE FUNCTION pgcache.on_type_change() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  published text;
BEGIN
  FOR published IN
    SELECT DISTINCT pgcache.published_table(a.attrelid)
      FROM pg_event_trigger_ddl_commands() cmd
      JOIN pg_type t ON t.oid = cmd.objid
           OR t.typelem = cmd.objid OR t.typbasetype = cmd.objid
      JOIN pg_attribute a ON a.atttypid = t.oid AND a.attnum > 0 AND NOT a.attisdropped
     WHERE cmd.object_type IN ('type', 'domain')
  LOOP
    IF published IS NOT NULL THEN
      PERFORM pgcache.emit('resync', published);
    END IF;
  END LOOP;
END
$$;
REVOKE ALL ON FUNCTION pgcache.on_type_change() FROM PUBLIC;

DROP EVENT TRIGGER IF EXISTS pgcache_type;
CREATE EVENT TRIGGER pgcache_type ON ddl_command_end
  WHEN TAG IN ('ALTER TYPE', 'ALTER DOMAIN') EXECUTE FUNCTION pgcache.on_type_change();

-- ALTER PUBLICATION (a table dropped from it, a row filter added) and ALTER SCHEMA (a rename
-- of every table in it) change which rows reach the daemon, with nothing in the stream to say
-- so: the daemon checks every cached table.
CREATE OR REPLACE FUNCTION pgcache.on_publication_or_schema() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  -- (Postgres does not report which tables an ALTER PUBLICATION ... DROP TABLE touched, so
  -- any of them counts; both are rare.)
  PERFORM pgcache.emit('check', '*');
END
$$;
REVOKE ALL ON FUNCTION pgcache.on_publication_or_schema() FROM PUBLIC;

DROP EVENT TRIGGER IF EXISTS pgcache_publication;
CREATE EVENT TRIGGER pgcache_publication ON ddl_command_end
  WHEN TAG IN ('ALTER PUBLICATION', 'ALTER SCHEMA')
  EXECUTE FUNCTION pgcache.on_publication_or_schema();

DROP EVENT TRIGGER IF EXISTS pgcache_drop;
-- (DROP SCHEMA ... CASCADE and DROP OWNED drop tables too.)
CREATE EVENT TRIGGER pgcache_drop ON sql_drop
  WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA', 'DROP OWNED') EXECUTE FUNCTION pgcache.on_drop();

-- Watch the partitions that exist now.
SELECT count(*) AS partitions_watched
  FROM pg_publication_tables t
  JOIN pg_namespace n ON n.nspname = t.schemaname
  JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.tablename AND c.relkind = 'p'
  CROSS JOIN LATERAL pgcache.watch_partitions(c.oid)
 WHERE t.pubname = current_setting('pgcache.publication');

-- Record the columns of the tables published now.
INSERT INTO pgcache.columns
SELECT c.oid, pgcache.columns_of(c.oid), format('%s.%s', n.nspname, c.relname)
  FROM pg_publication_tables t
  JOIN pg_namespace n ON n.nspname = t.schemaname
  JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.tablename
 WHERE t.pubname = current_setting('pgcache.publication')
ON CONFLICT (relid) DO UPDATE SET columns = excluded.columns, name = excluded.name;
