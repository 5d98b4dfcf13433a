"""The pure unlearning core: placement, training, the methods and their budgets.

Nothing in here knows about Kafka, Celery or SQL; it takes plain data and returns plain data.
"""
