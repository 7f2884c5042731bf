-- A rewind (`kafka-pg-ingest offsets rewind`) moves next_offset back and remembers where
-- the partition stood in replay_until: records re-read below it replace the rows already
-- there (or, with replay_keep, leave them), instead of colliding with them. The commit
-- that passes replay_until clears it, and writing returns to the plain COPY.
ALTER TABLE ingest.offsets
    ADD COLUMN replay_until bigint,
    ADD COLUMN replay_keep  boolean NOT NULL DEFAULT false;
