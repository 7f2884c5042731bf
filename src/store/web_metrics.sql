-- The table of the default route (website metrics), created by `migrate` in schema
-- web_metrics when a route writes into it and it does not exist yet; the ingest schema
-- does not own it.
CREATE TABLE IF NOT EXISTS web_metrics.metrics (
    id                 bigserial   PRIMARY KEY,
    time_stamp         timestamptz NOT NULL,
    url                text        NOT NULL,
    agent              text,
    response_time      interval,
    status_code        integer,
    ip                 inet,
    content_validation boolean,
    comment            text,
    kafka_topic        text        NOT NULL,
    kafka_partition    integer     NOT NULL,
    kafka_offset       bigint      NOT NULL,
    -- Exactly once is enforced by the offset protocol; this index makes a breach loud
    -- and makes replays and audits by source coordinates possible.
    CONSTRAINT metrics_source_key UNIQUE (kafka_topic, kafka_partition, kafka_offset)
);

CREATE INDEX IF NOT EXISTS metrics_time_stamp_idx ON web_metrics.metrics (time_stamp);
