-- Privileges of the kafka-pg-ingest worker role: what `kafka-pg-ingest run` needs (and
-- the `offsets` and `dlq` commands), nothing more. It owns no object and cannot change
-- the schema: the owner applies migrations with `kafka-pg-ingest migrate`, and the worker
-- runs with postgres.migrate_on_start: false.
--
-- Run as the owner of the migrated tables, connected to the worker's database:
--   psql -v worker=kafka_pg_ingest -f deploy/grants.sql "$OWNER_DATABASE_URL"
-- :"worker" is the worker's role; :"DBNAME" is psql's name of the current database.

-- Replays that keep existing rows stage the re-read ones in a temporary table.
GRANT CONNECT, TEMPORARY ON DATABASE :"DBNAME" TO :"worker";
GRANT USAGE ON SCHEMA ingest TO :"worker";

-- Claims (INSERT .. ON CONFLICT DO UPDATE .. RETURNING) and the compare-and-set advance.
GRANT SELECT, INSERT, UPDATE ON ingest.offsets TO :"worker";

-- Written with each batch; a replay deletes those of the range it re-reads, and
-- `dlq retry` deletes the ones it moves and updates the ones that fail again.
GRANT SELECT, INSERT, UPDATE, DELETE ON ingest.dead_letters TO :"worker";
GRANT USAGE ON SEQUENCE ingest.dead_letters_id_seq TO :"worker";

-- Offsets skipped under kafka.on_data_loss: skip, recorded with the partition's next batch.
GRANT SELECT, INSERT ON ingest.offset_gaps TO :"worker";
GRANT USAGE ON SEQUENCE ingest.offset_gaps_id_seq TO :"worker";

-- The default route's table, where `migrate` created it (a configuration whose routes
-- write elsewhere has none; grant the same on those tables). Rows arrive by COPY; a
-- replay deletes the rows it replaces, or inserts only the re-read rows that are missing.
SELECT to_regclass('web_metrics.metrics') IS NOT NULL AS default_table \gset
\if :default_table
GRANT USAGE ON SCHEMA web_metrics TO :"worker";
GRANT SELECT, INSERT, DELETE ON web_metrics.metrics TO :"worker";
GRANT USAGE ON SEQUENCE web_metrics.metrics_id_seq TO :"worker";
\endif
