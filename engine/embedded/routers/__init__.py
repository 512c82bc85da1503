"""One router module per API surface of the engine replica."""
