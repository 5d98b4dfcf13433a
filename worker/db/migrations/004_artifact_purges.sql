-- Artifact files that carry erased rows, queued in the transaction that publishes the version
-- which no longer needs them, and deleted right after it commits (or by the sweeper after a crash).
CREATE TABLE artifact_purges (
    model     text NOT NULL,
    sha256    text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    queued_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, sha256)
);
