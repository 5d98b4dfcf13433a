-- Methods are found in worker/core (worker.registry.method_names): a new method is a new module and
-- nothing else, so the database no longer keeps its own list of them.
ALTER TABLE models DROP CONSTRAINT IF EXISTS models_method_check;
