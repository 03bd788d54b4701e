"""qkvconv: make LLM checkpoints safe to move between attention-weight layouts."""

__version__ = "0.1.0"
