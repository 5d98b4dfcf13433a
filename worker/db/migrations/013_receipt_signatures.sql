-- Receipts are signed with the worker's Ed25519 key as they are issued (worker.signing); the
-- signature is kept so `unlearn verify` re-checks it. Receipts issued before this migration have
-- none and are flagged; a later one without one fails verification.
ALTER TABLE receipts ADD COLUMN signature text;
ALTER TABLE receipts ADD COLUMN issued_unsigned boolean NOT NULL DEFAULT false;
UPDATE receipts SET issued_unsigned = true;
