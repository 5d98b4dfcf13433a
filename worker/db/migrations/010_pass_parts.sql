-- Issue 11: a pass that retrains several shards fans them out, one task per shard, and joins here.
-- One row per shard the model's running pass retrains (at most one pass per model holds its lock):
-- what to retrain (from the version `base_version`, slices start_slice.. on the snapshot's rows
-- `sample_ids`), and once done the method's result for it (checkpoint digests and lineage).
-- The pass that publishes deletes its parts; a crashed pass's parts are reused by the next pass
-- when they describe the same work, and replaced otherwise.
CREATE TABLE pass_parts (
    part_id       uuid PRIMARY KEY,
    model         text NOT NULL REFERENCES models (name),
    base_version  integer NOT NULL,
    shard         integer NOT NULL CHECK (shard >= 0),
    start_slice   integer NOT NULL CHECK (start_slice >= 0),
    sample_ids    text[] NOT NULL,
    rows_sha256   text NOT NULL CHECK (rows_sha256 ~ '^[0-9a-f]{64}$'),
    status        text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'failed')),
    result        jsonb,
    failure_code  text,
    attempts      integer NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    UNIQUE (model, shard),
    CHECK ((status = 'done') = (result IS NOT NULL))
);
