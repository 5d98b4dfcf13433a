-- Which datasets were loaded, so a second `data load` can never bring erased rows back.
CREATE TABLE datasets (
    name        text PRIMARY KEY,
    num_classes integer NOT NULL CHECK (num_classes >= 2),
    rows_loaded integer NOT NULL,
    loaded_at   timestamptz NOT NULL DEFAULT now()
);
