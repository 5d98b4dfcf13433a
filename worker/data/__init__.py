"""Training rows in PostgreSQL: the datasets' records (`store`), importing a team's rows from
Parquet, CSV or JSON Lines (`importer`, `sources`, `mapping`), the built-in datasets loaded through
the same importer (`builtin`) and the tombstones that keep erased rows from coming back
(`tombstones`).

A training set carries, per row, an opaque group key derived from its subject (`group_key`) so
that training can keep a subject's rows in one batch; the subject id itself never leaves this
package.
"""

from worker.data.builtin import (
    BUILTIN,
    ROWS_PER_SUBJECT,
    SYNTHETIC,
    SYNTHETIC_MAX_ROWS,
    LoadedRows,
    builtin_spec,
    check_rows,
    load_into_postgres,
    prepare_rows,
    synthetic_blocks,
)
from worker.data.importer import Imported, ImportRefused, import_rows
from worker.data.mapping import Mapping
from worker.data.store import (
    HOLDOUT_PERCENT,
    PUBLIC_PERCENT,
    SPLITS,
    DatasetSpec,
    UnknownDataset,
    group_key,
    names,
    read_training_set,
    shaped_features,
    shaped_rows,
    spec,
    split_of,
)

__all__ = [
    "BUILTIN", "HOLDOUT_PERCENT", "PUBLIC_PERCENT", "ROWS_PER_SUBJECT", "SPLITS", "SYNTHETIC", "SYNTHETIC_MAX_ROWS",
    "DatasetSpec", "ImportRefused", "Imported", "LoadedRows", "Mapping", "UnknownDataset", "builtin_spec",
    "check_rows", "group_key", "import_rows", "load_into_postgres", "names", "prepare_rows", "read_training_set",
    "shaped_features", "shaped_rows", "spec", "split_of", "synthetic_blocks",
]
