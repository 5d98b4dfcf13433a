"""unlearning-worker: erase a data subject's rows and their influence on trained models."""

__version__ = "0.1.0"
