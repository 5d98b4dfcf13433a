"""The erasure pipeline: Kafka intake, the ledger, Celery tasks, the outbox relay and metrics."""
