"""The pure unlearning core: placement, training, the methods (`worker.core.methods`, one module
each) and the components they share.

Nothing in here knows about Kafka, Celery or SQL; it takes plain data and returns plain data.
"""
