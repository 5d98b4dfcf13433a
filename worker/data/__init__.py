"""Training rows in PostgreSQL: the datasets' records (`store`), importing a team's rows from
Parquet, CSV or JSON Lines (`importer`, `sources`, `mapping`), the built-in datasets loaded through
the same importer (`builtin`) and the tombstones that keep erased rows from coming back
(`tombstones`).

A training set carries, per row, an opaque group key derived from its subject (`group_key`) so
that training can keep a subject's rows in one batch; the subject id itself never leaves this
package.

Names are imported on first use (PEP 562), so the offline rows (`builtin`, the splits and shapes of
`store`) load where no PostgreSQL client is installed (`python -m worker.bench.gpu`).
"""

import importlib

_WHERE = {
    "builtin": ("BUILTIN", "ROWS_PER_SUBJECT", "SYNTHETIC", "SYNTHETIC_MAX_ROWS", "LoadedRows", "builtin_spec",
                "check_rows", "load_into_postgres", "prepare_rows", "synthetic_blocks"),
    "importer": ("Imported", "ImportRefused", "import_rows"),
    "mapping": ("Mapping",),
    "store": ("HOLDOUT_PERCENT", "PUBLIC_PERCENT", "SPLITS", "DatasetSpec", "UnknownDataset", "group_key", "names",
              "read_training_set", "shaped_features", "shaped_rows", "spec", "split_of"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> object:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
