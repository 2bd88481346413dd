-- pgcache: which published tables need REPLICA IDENTITY changes.
--
--   psql -v publication=pgcache -f sql/replica_identity.sql
--
-- A DELETE (or an UPDATE that changes the key) sends only the replica identity columns of the
-- old row. pgcache computes the old Redis key from them, so every column of a table's key
-- template must be in its replica identity: the primary key by default. A table without a
-- primary key has no replica identity, and Postgres rejects UPDATE and DELETE on it once it is
-- published. For those, and for templates that use other columns, the fix is shown.
\set ON_ERROR_STOP on
SELECT format('%I.%I', p.schemaname, p.tablename) AS table_name,
       CASE c.relreplident WHEN 'd' THEN 'default (primary key)' WHEN 'f' THEN 'full'
                           WHEN 'i' THEN 'index' ELSE 'nothing' END AS replica_identity,
       (SELECT string_agg(a.attname, ', ' ORDER BY a.attnum)
          FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
         WHERE i.indrelid = c.oid AND ((c.relreplident = 'd' AND i.indisprimary)
                                    OR (c.relreplident = 'i' AND i.indisreplident))) AS identity_columns,
       CASE
         WHEN c.relreplident = 'f' THEN 'ok: every column is sent'
         WHEN c.relreplident = 'n'
           OR (c.relreplident = 'd' AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))
           THEN format('ALTER TABLE %I.%I REPLICA IDENTITY FULL;  -- or add a primary key', p.schemaname, p.tablename)
         ELSE 'ok if the key template uses only the identity columns, else: '
              || format('ALTER TABLE %I.%I REPLICA IDENTITY FULL;', p.schemaname, p.tablename)
       END AS advice
  FROM pg_publication_tables p
  JOIN pg_namespace n ON n.nspname = p.schemaname
  JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename
 WHERE p.pubname = :'publication'
 ORDER BY 1;
