-- Offsets live here, not in Kafka: the row for a partition is advanced in the same
-- transaction that writes the partition's rows and dead letters.
CREATE SCHEMA IF NOT EXISTS ingest;

CREATE TABLE ingest.offsets (
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    -- NULL until the first batch commits: the reset policy decides where to start.
    next_offset    bigint,
    -- Bumped by every claim; a commit must carry the epoch it claimed (fencing).
    epoch          bigint      NOT NULL,
    owner          text        NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);

CREATE TABLE ingest.dead_letters (
    id              bigserial   PRIMARY KEY,
    consumer_group  text        NOT NULL,
    topic           text        NOT NULL,
    partition       integer     NOT NULL,
    "offset"        bigint      NOT NULL,
    key             bytea,
    value           bytea,
    headers         jsonb       NOT NULL DEFAULT '[]',
    kafka_timestamp timestamptz,
    reason_code     text        NOT NULL,
    reason          text        NOT NULL,
    sqlstate        text,
    trace_id        text,
    attempts        integer     NOT NULL DEFAULT 1,
    first_failed_at timestamptz NOT NULL DEFAULT now(),
    last_failed_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (consumer_group, topic, partition, "offset")
);

CREATE INDEX dead_letters_reason_idx ON ingest.dead_letters (reason_code, first_failed_at);
