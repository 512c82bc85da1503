"""One router module per API surface (see gateway.app.ROUTER_MODULES)."""
