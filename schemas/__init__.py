"""JSON Schemas (2020-12) of each event type's `data`; installed as the package `worker.schemas`."""
