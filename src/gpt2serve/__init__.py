"""gpt2serve: a fast GPT-2 text-generation server."""

__version__ = "0.1.0"
