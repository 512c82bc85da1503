"""The embedded engine: our own transformers + peft replica for CPU machines, development and
parity checks, speaking vLLM's OpenAI HTTP protocol."""
