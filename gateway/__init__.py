"""The gateway: API keys, quotas, routing, streaming, the OpenAI API and /v1/generate."""
