"""Dependency-light code used by the gateway, the engine and the trainer."""
