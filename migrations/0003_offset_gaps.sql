-- Offsets a partition skipped because the broker no longer had them, recorded under
-- kafka.on_data_loss: skip in the same transaction as the partition's next batch. Every
-- offset of a partition is a row of the target table, a dead letter, or inside one of
-- these ranges [from_offset, to_offset).
CREATE TABLE ingest.offset_gaps (
    id             bigserial   PRIMARY KEY,
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    from_offset    bigint      NOT NULL,
    to_offset      bigint      NOT NULL,
    -- below_log_start: retention deleted the records before they were ingested;
    -- beyond_log_end: the topic was re-created (or its log truncated), and the new log's
    -- records below the stored offset were skipped.
    reason         text        NOT NULL,
    low_watermark  bigint      NOT NULL,
    high_watermark bigint      NOT NULL,
    detected_at    timestamptz NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX offset_gaps_partition_idx ON ingest.offset_gaps (consumer_group, topic, partition);
