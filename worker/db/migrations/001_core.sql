-- Training rows, models and where each sample went into each model.

CREATE TABLE training_samples (
    sample_id   text PRIMARY KEY,
    subject_id  text,
    dataset     text NOT NULL,
    split       text NOT NULL CHECK (split IN ('train', 'holdout', 'public')),
    label       integer NOT NULL,
    features    real[] NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- only public rows may be ownerless; they are never erasable
    CONSTRAINT subject_unless_public CHECK ((subject_id IS NULL) = (split = 'public'))
);
CREATE INDEX training_samples_subject_idx ON training_samples (subject_id) WHERE subject_id IS NOT NULL;
CREATE INDEX training_samples_dataset_split_idx ON training_samples (dataset, split);

CREATE TABLE models (
    name            text PRIMARY KEY,
    method          text NOT NULL CHECK (method IN ('sisa', 'amnesiac', 's3t')),
    dataset         text NOT NULL,
    seed            bigint NOT NULL,
    options         jsonb NOT NULL DEFAULT '{}'::jsonb,
    current_version integer,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE model_versions (
    model                     text NOT NULL REFERENCES models (name) ON DELETE CASCADE,
    version                   integer NOT NULL CHECK (version >= 1),
    parent_version            integer,
    method                    text NOT NULL,
    manifest_uri              text NOT NULL,
    manifest_sha256           text NOT NULL CHECK (manifest_sha256 ~ '^[0-9a-f]{64}$'),
    components_changed        text[] NOT NULL DEFAULT '{}',
    deletion_budget_remaining double precision,
    metrics                   jsonb NOT NULL DEFAULT '{}'::jsonb,
    revoked                   boolean NOT NULL DEFAULT false,
    created_at                timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, version)
);

-- Where each training sample went: SISA/S3T shard and slice, its position in the slice.
-- Rows of erased samples are removed together with the sample.
CREATE TABLE sample_placement (
    model     text NOT NULL REFERENCES models (name) ON DELETE CASCADE,
    sample_id text NOT NULL,
    shard     integer NOT NULL CHECK (shard >= 0),
    slice     integer NOT NULL CHECK (slice >= 0),
    position  integer NOT NULL CHECK (position >= 0),
    PRIMARY KEY (model, sample_id)
);
CREATE INDEX sample_placement_sample_idx ON sample_placement (sample_id);
CREATE INDEX sample_placement_component_idx ON sample_placement (model, shard, slice);

-- Every training step's batch (Amnesiac), with the artifact holding its parameter update.
CREATE TABLE batch_log (
    model         text NOT NULL REFERENCES models (name) ON DELETE CASCADE,
    shard         integer NOT NULL DEFAULT 0,
    epoch         integer NOT NULL CHECK (epoch >= 0),
    step          integer NOT NULL CHECK (step >= 0),
    sample_ids    text[] NOT NULL,
    update_sha256 text,
    update_bytes  bigint,
    PRIMARY KEY (model, shard, epoch, step)
);
CREATE INDEX batch_log_samples_idx ON batch_log USING gin (sample_ids);
