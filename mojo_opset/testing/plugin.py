"""pytest plugin (auto-loaded through the ``pytest11`` entry point)."""
