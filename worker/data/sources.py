"""Reading a team's rows from Parquet, CSV or JSON Lines as Arrow record batches, a chunk at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa

from worker.data.mapping import Mapping

BATCH_ROWS = 65_536
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".json": "jsonl"}

Batches = Callable[[], Iterator[pa.RecordBatch]]  # opens the rows afresh at every call


class SourceError(ValueError):
    """A file that cannot be read as rows (its format, or a column the mapping needs)."""


def file_format(path: Path) -> str:
    try:
        return FORMATS[Path(path).suffix.lower()]
    except KeyError:
        raise SourceError(f"{path}: unknown format; name a .parquet, .csv or .jsonl file") from None


def open_file(path: Path, mapping: Mapping) -> tuple[Batches, int | None]:
    """A way to read the file's mapped columns batch by batch, and its row count when known
    without reading it (Parquet). A column the mapping names and the file lacks is a SourceError."""
    path = Path(path)
    kind = file_format(path)
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    if kind == "parquet":
        import pyarrow.parquet as pq

        with pq.ParquetFile(path) as probe:
            _check_columns(path, probe.schema_arrow.names, mapping)
            rows = probe.metadata.num_rows

        def parquet() -> Iterator[pa.RecordBatch]:
            with pq.ParquetFile(path) as reader:
                yield from reader.iter_batches(batch_size=BATCH_ROWS, columns=mapping.columns)
        return _reading(path, parquet), rows
    if kind == "csv":
        import pyarrow.csv as csv

        header = csv.open_csv(path).schema.names
        _check_columns(path, header, mapping)
        # ids and categories stay text ("007" is not 7); an empty cell is a missing value
        text = [mapping.sample_id, mapping.subject_id, *([mapping.split] if mapping.split else []),
                *mapping.categorical]
        convert = csv.ConvertOptions(include_columns=mapping.columns, strings_can_be_null=True, null_values=[""],
                                     column_types={name: pa.string() for name in text})

        def csv_rows() -> Iterator[pa.RecordBatch]:
            yield from csv.open_csv(path, read_options=csv.ReadOptions(block_size=1 << 22),
                                    convert_options=convert)
        return _reading(path, csv_rows), None
    import pyarrow.json as json

    def json_rows() -> Iterator[pa.RecordBatch]:
        reader = json.open_json(path, read_options=json.ReadOptions(block_size=1 << 22))
        for batch in reader:
            _check_columns(path, batch.schema.names, mapping)
            yield batch.select([c for c in mapping.columns if c in batch.schema.names])
    return _reading(path, json_rows), None


def _check_columns(path: Path, present: list[str], mapping: Mapping) -> None:
    missing = [c for c in mapping.columns if c not in present
               and not (c == mapping.subject_id and path.suffix.lower() in (".jsonl", ".ndjson", ".json"))]
    if missing:
        raise SourceError(f"{path}: column(s) {', '.join(repr(c) for c in missing)} named by the mapping "
                          f"are missing; the file has {', '.join(repr(c) for c in present)}")


def _reading(path: Path, batches: Batches) -> Batches:
    """`batches`, with Arrow's read errors (a value of the wrong type...) named by the file."""
    def read() -> Iterator[pa.RecordBatch]:
        try:
            yield from batches()
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
            raise SourceError(f"{path}: cannot read it as rows: {exc}") from None
    return read
