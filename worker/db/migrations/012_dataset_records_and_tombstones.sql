-- A dataset is a record in the database: what a row's features are (shape, scale, names,
-- categorical vocabularies) and what its labels are, so training and serving need no code for it.
-- Imports may append rows: each import is a generation, and a model trains on the rows of the
-- generations up to the one current when it trained, also in every later retrain.
ALTER TABLE datasets
    ADD COLUMN input_shape   integer[],
    ADD COLUMN scale         real NOT NULL DEFAULT 1 CHECK (scale > 0),
    ADD COLUMN feature_names text[],
    ADD COLUMN categories    jsonb NOT NULL DEFAULT '{}'::jsonb,  -- feature name -> vocabulary (code i = item i)
    ADD COLUMN class_names   text[],  -- label i's name when labels were text; NULL: integer labels
    ADD COLUMN generation    integer NOT NULL DEFAULT 0 CHECK (generation >= 0),
    ADD COLUMN builtin       boolean NOT NULL DEFAULT false,
    -- `unlearn data register`: the rows live in this table or view ([schema, name]), its columns
    -- named by `source_columns` (worker.data.rowsource); NULL: in training_samples
    ADD COLUMN source_table   text[],
    ADD COLUMN source_columns jsonb;

-- datasets loaded before this migration were the built-in ones
UPDATE datasets d SET input_shape = b.shape, scale = b.scale, builtin = true,
       feature_names = ARRAY(SELECT 'features[' || i || ']' FROM generate_series(0, b.width - 1) AS i)
  FROM (VALUES ('digits', ARRAY[1, 8, 8], 16.0, 64), ('letter', ARRAY[16], 15.0, 16),
               ('mnist5k', ARRAY[1, 28, 28], 255.0, 784), ('synthetic', ARRAY[16], 100.0, 16))
       AS b (name, shape, scale, width)
 WHERE d.name = b.name;

ALTER TABLE training_samples ADD COLUMN generation integer NOT NULL DEFAULT 0;
ALTER TABLE models ADD COLUMN data_generation integer NOT NULL DEFAULT 0;

-- Keyed hashes (HMAC-SHA256, worker.data.tombstones) of every erased subject and sample, never
-- the ids themselves: an import skips the rows they match, so erased rows never come back.
CREATE TABLE erasure_tombstones (
    kind        text NOT NULL CHECK (kind IN ('subject', 'sample')),
    digest      bytea NOT NULL CHECK (length(digest) = 32),
    erased_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, digest)
);
