-- The ledger keeps an event's id only as a keyed hash (HMAC-SHA256 under the tombstone key; the
-- worker computes it): upstream chooses the id and may derive it from a person. `source` names
-- the upstream system and stays text. Rows recorded before keep their text (they cannot be
-- re-keyed here: the key lives outside the database); new rows have no event_id.
ALTER TABLE erasure_requests ADD COLUMN event_key bytea CHECK (octet_length(event_key) = 32);
ALTER TABLE erasure_requests ALTER COLUMN event_id DROP NOT NULL;
ALTER TABLE erasure_requests ADD CONSTRAINT erasure_requests_event_key_uniq UNIQUE (event_key);
ALTER TABLE erasure_requests ADD CONSTRAINT erasure_requests_event_known
    CHECK (event_key IS NOT NULL OR event_id IS NOT NULL);
