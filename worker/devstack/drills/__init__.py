"""Fault drills for the intake: a real `unlearn intake` process against a `PrivateStack`.

Each drill does what an operator dreads (a flood of hostile events, kill -9 mid-batch, a replay of
the whole topic, PostgreSQL and the broker going away) and returns what it observed, read back from
the broker and the database. `tests/test_intake_faults.py` asserts on the observations and
`unlearn bench --only reliability` reports them. Every drill has its own requests topic and
consumer group ("lane"), so drills can share one stack.

`harness` publishes records and reads back what happened (the ledger, the dead letters, a
consumer group's progress); `hostile` generates the hostile events; `intake` holds the drills of
the intake and `worker` the drill of a running `unlearn worker` under outages.
"""
