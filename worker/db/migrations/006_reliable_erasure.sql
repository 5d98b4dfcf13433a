-- Issue 9: a `completed` receipt is true under bad input, faults and concurrency.

-- A model that cannot unlearn is withdrawn from serving and waits for an operator to re-drive it
-- (`unlearn retry`), which retrains it from scratch on the rows left.
ALTER TABLE models
    ADD COLUMN status text NOT NULL DEFAULT 'serving'
        CHECK (status IN ('serving', 'needs_full_retrain', 'full_retrain_requested')),
    ADD COLUMN failure_code text;

-- A withdrawal marker version keeps the state for the next pass but has nothing to serve.
ALTER TABLE model_versions
    ADD COLUMN servable boolean NOT NULL DEFAULT true,
    ADD COLUMN superseded_by integer;

-- Why a request failed, as a code (never raw exception text, which may echo input).
ALTER TABLE erasure_requests ADD COLUMN failure_code text;

-- Pending Amnesiac steps are resolved from batch_log under the model lock when the pass plans,
-- never remembered from the moment the rows were deleted (a retrain may have replaced them since).
ALTER TABLE pending_unlearning DROP COLUMN steps;

-- The receipt chain: one linear hash chain, appended under an advisory lock, numbered by `seq`.
-- A request may have more than one receipt (failed, then completed after `unlearn retry`).
CREATE TABLE receipts (
    seq              bigint PRIMARY KEY CHECK (seq >= 1),
    request_id       uuid NOT NULL REFERENCES erasure_requests (request_id),
    status           text NOT NULL CHECK (status IN ('completed', 'rejected', 'failed')),
    body             jsonb NOT NULL,
    receipt_sha256   text NOT NULL UNIQUE CHECK (receipt_sha256 ~ '^[0-9a-f]{64}$'),
    previous_sha256  text,
    completed_at     timestamptz NOT NULL,
    -- receipts issued before the chain was numbered may fork; they are kept, flagged, never extended
    legacy           boolean NOT NULL DEFAULT false,
    CONSTRAINT receipts_genesis CHECK ((previous_sha256 IS NULL) = (seq = 1) OR legacy)
);
CREATE INDEX receipts_request_idx ON receipts (request_id, seq);
-- no two receipts name the same predecessor: the chain cannot fork
CREATE UNIQUE INDEX receipts_previous_uniq ON receipts (previous_sha256) WHERE NOT legacy;

INSERT INTO receipts (seq, request_id, status, body, receipt_sha256, previous_sha256, completed_at, legacy)
SELECT row_number() OVER (ORDER BY completed_at, request_id), request_id, status, receipt, receipt_sha256,
       receipt ->> 'previous_receipt_sha256', completed_at, true
FROM erasure_requests WHERE receipt IS NOT NULL;

ALTER TABLE erasure_requests DROP COLUMN receipt, DROP COLUMN receipt_sha256;

-- Outbox messages carry a Kafka key (the model name for versions), so one key's events keep order.
ALTER TABLE outbox ADD COLUMN key text;

-- Deliveries of a task that never finished cleanly (the worker process died under it): after a
-- few, the work is parked as failed instead of being redelivered forever.
CREATE TABLE task_attempts (
    task        text NOT NULL,
    key         text NOT NULL,
    unfinished  integer NOT NULL DEFAULT 0,
    started_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task, key)
);

-- Revoked versions get a revocation record next to their manifest, for serving without a database;
-- this says it was written (the sweeper writes any that a crash left out).
ALTER TABLE model_versions ADD COLUMN revocation_recorded boolean NOT NULL DEFAULT false;

-- GDPR Art. 12(3): the deadline may be extended once by two further months, with a reason; the
-- receipt shows it ({"reason", "extended_at", "previous_due_at"}).
ALTER TABLE erasure_requests ADD COLUMN extension jsonb;
