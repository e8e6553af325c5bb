"""llamaduo: move a task from a service LLM to a small local model you own."""

__version__ = "0.1.0"
