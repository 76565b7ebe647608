"""Helpers for downstream tests: parametrize over backends and assert closeness to the reference."""
