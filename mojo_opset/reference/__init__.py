"""The torch reference: the math of every op, the definition of correct (SPEC §3).

Functions here take plain tensors and validated arguments; nothing here dispatches.  The public,
validated and dispatched functions live in :mod:`mojo_opset.functional`."""
