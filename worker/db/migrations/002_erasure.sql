-- The erasure ledger, the work it leaves for each model, and the transactional outbox.

CREATE TABLE erasure_requests (
    request_id        uuid PRIMARY KEY,
    source            text NOT NULL,
    event_id          text NOT NULL,
    regulation        text NOT NULL,
    -- the subject is needed only until its rows are deleted; cleared then
    subject_id        text,
    sample_ids        text[] NOT NULL DEFAULT '{}',
    models            text[],
    status            text NOT NULL DEFAULT 'received'
                      CHECK (status IN ('received', 'rows_deleted', 'completed', 'rejected', 'failed')),
    rows_deleted      integer,
    submitted_at      timestamptz,
    received_at       timestamptz NOT NULL DEFAULT now(),
    -- GDPR Art. 12(3): answer within one month of receipt (calendar month arithmetic)
    due_at            timestamptz NOT NULL,
    completed_at      timestamptz,
    attempts          integer NOT NULL DEFAULT 0,
    last_error        text,
    -- filled in as each affected model publishes its unlearned version
    model_versions    jsonb NOT NULL DEFAULT '[]'::jsonb,
    evidence          jsonb NOT NULL DEFAULT '{}'::jsonb,
    receipt           jsonb,
    receipt_sha256    text,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT erasure_requests_source_event_uniq UNIQUE (source, event_id),
    CONSTRAINT erasure_requests_due_after_receipt CHECK (due_at > received_at)
);
CREATE INDEX erasure_requests_open_idx ON erasure_requests (status, updated_at)
    WHERE status NOT IN ('completed', 'rejected', 'failed');

-- Deletions a model still has to unlearn: one row per (request, model, erased sample).
-- The erased row's label and features stay here only until the model has forgotten it, so the
-- membership-inference evidence can be measured; the row goes in the transaction that publishes.
CREATE TABLE pending_unlearning (
    request_id uuid NOT NULL REFERENCES erasure_requests (request_id),
    model      text NOT NULL REFERENCES models (name) ON DELETE CASCADE,
    sample_id  text NOT NULL,
    shard      integer,
    slice      integer,
    steps      integer[] NOT NULL DEFAULT '{}',  -- flattened (shard, epoch, step) triples
    label      integer NOT NULL,
    features   real[] NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (request_id, model, sample_id)
);
CREATE INDEX pending_unlearning_model_idx ON pending_unlearning (model);

CREATE TABLE outbox (
    id         bigserial PRIMARY KEY,
    topic      text NOT NULL,
    event_id   text NOT NULL UNIQUE,
    payload    bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    sent_at    timestamptz
);
CREATE INDEX outbox_unsent_idx ON outbox (id) WHERE sent_at IS NULL;
