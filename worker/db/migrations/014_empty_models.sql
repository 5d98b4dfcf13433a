-- A model whose dataset has no training rows left is `empty`: it serves nothing, and the requests
-- that erased its last rows complete. The features of erased rows are kept only while a pass may
-- need them (membership evidence): a withdrawn model's are dropped.
ALTER TABLE models DROP CONSTRAINT models_status_check;
ALTER TABLE models ADD CONSTRAINT models_status_check
    CHECK (status IN ('serving', 'needs_full_retrain', 'full_retrain_requested', 'empty'));
ALTER TABLE pending_unlearning ALTER COLUMN label DROP NOT NULL, ALTER COLUMN features DROP NOT NULL;
