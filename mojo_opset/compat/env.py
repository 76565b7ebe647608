"""The original mojo_opset's environment variables and what each means here (docs/migrating.md).

``ENV_VARS`` maps each variable to ``(equivalent here or None, explanation)``;
:func:`original_env_settings` reports the ones set in the current environment, so a migrated job can
log which of its settings still act and which have no effect.
"""
from __future__ import annotations

import os

__all__ = ["ENV_VARS", "original_env_settings"]

ENV_VARS: dict[str, tuple[str | None, str]] = {
    "MOJO_BACKEND": (
        "MOJO_BACKEND",
        "same variable: the backend of every op (torch, triton, ttx, npu; the original's torch_npu is an alias of "
        "npu, names are case-insensitive, ixformer is listed unavailable). The Mojo* classes read it at "
        "construction, as the original did; the functional ops read it at each call. MOJO_BACKEND_<OP> picks one "
        "op's backend."),
    "MOJO_DETERMINISTIC": (
        "MOJO_DETERMINISTIC",
        "same variable, with this library's meaning: batch-invariant, run-to-run identical MoE ops (also "
        "mo.deterministic()). Unlike the original it does not call torch.use_deterministic_algorithms, seed "
        "the RNG or set CLOSE_MATMUL_K_SHIFT at import; do that in the job if other code relies on it."),
    "MOJO_RUN_MODE": (
        None,
        "no effect: every backend's kernels are always registered as torch.library custom ops, so "
        "torch.compile(fullgraph=True) works without a switch (the original's COMPILE mode)."),
    "MOJO_OPSET_VERBOSITY": (
        None,
        "no effect: messages go to the standard logger 'mojo_opset'; set its level, e.g. "
        "logging.getLogger('mojo_opset').setLevel('DEBUG')."),
    "MOJO_DEBUG": (
        None,
        "no effect (the original's MojoDebugger): mo.explain() names the implementation that served each op and "
        "every fallback with its reason; `mojo-opset compare` checks every backend against the reference."),
    "MOJO_DEBUG_COMPARE": (None, "no effect: compare a backend with forward_diff_with or `mojo-opset compare`."),
    "MOJO_DEBUG_COMPARE_MODE": (None, "no effect (see MOJO_DEBUG_COMPARE)."),
    "MOJO_DEBUG_DUMP": (None, "no effect: the original's tensor dumps have no equivalent."),
    "MOJO_DEBUG_DUMP_DIR": (None, "no effect (see MOJO_DEBUG_DUMP)."),
    "MOJO_DEBUG_MAX_STEPS": (None, "no effect (see MOJO_DEBUG_DUMP)."),
    "MOJO_OPSET_PLUGIN_AUTOLOAD": (
        None,
        "no effect: backends are found through the 'mojo_opset.backends' entry points when first used; a "
        "backend that fails to load is listed unavailable with the reason and never breaks the import."),
    "MOJO_DISABLE_ASSERTION_REWRITE": (None, "no effect: errors here are exceptions naming the argument, not asserts."),
    "MOJO_DISABLE_TENSOR_GUARD": (None, "no effect (a guard of the original's ttx kernels)."),
    "MOJO_ASCEND_ARCH": (None, "no effect (the original's Ascend a2/a5 kernel choice)."),
    "MOJO_TTX_SHMEM_SIZE_MB": (None, "no effect (the original's compute-with-communication operators)."),
    "MOJO_SHMEM_SIZE_MB": (None, "no effect (the original's compute-with-communication operators)."),
    "MOJO_XOPS_SHMEM_SIZE_MB": (None, "no effect (the original's compute-with-communication operators)."),
    "MOJO_STORE_LABEL_CACHE_MAX_BATCH_BYTES": (None, "no effect (an operator outside the MoE set)."),
    "IXFORMER_DISABLE_SYNC": (None, "no effect: there is no ixformer backend here."),
}


def original_env_settings(environ=None) -> dict[str, dict]:
    """``{variable: {"value", "equivalent", "note"}}`` for the original's variables that are set."""
    environ = os.environ if environ is None else environ
    return {name: {"value": environ[name], "equivalent": eq, "note": note}
            for name, (eq, note) in ENV_VARS.items() if name in environ}
