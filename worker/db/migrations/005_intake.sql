-- Deadlines run from the earlier of submission and receipt (issue 9).

-- GDPR Art. 12(3): answer within one month of the request. The clock starts at the earlier of the
-- subject's submission and the worker's receipt, so a request that waited upstream is not given
-- extra time and a future `submitted_at` cannot postpone it. Calendar-month arithmetic in UTC
-- (31 Jan -> 28/29 Feb), whatever the session's time zone.
CREATE FUNCTION erasure_due_at(submitted_at timestamptz, received_at timestamptz)
RETURNS timestamptz LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT (least(submitted_at, received_at) AT TIME ZONE 'UTC' + interval '1 month') AT TIME ZONE 'UTC' $$;

-- A request submitted more than a month before it reached the worker is overdue on arrival: its
-- due date lies before its receipt, which the old rule (due = receipt + 1 month) forbade.
ALTER TABLE erasure_requests DROP CONSTRAINT erasure_requests_due_after_receipt;
