"""tunegate: serve and improve fine-tuned LLMs. This package holds the one CLI."""

__version__ = "0.1.0"
