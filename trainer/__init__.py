"""The training sidecar: validated data -> adapter -> evaluation gate -> registry, on arq/Redis."""
