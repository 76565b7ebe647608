"""Every mask the Triton kernels give a load or store is boolean.

Triton 3.9's interpreter rejects any other ("mask has unsupported dtype"); 3.6 and 3.8 accept it
silently, so this runs the kernels of every Triton-kernel backend over compare's fp32 matrix here
and records the masks the interpreter receives.
"""
import numpy as np
import pytest

from mojo_opset.tools.cli import main

interpreter = pytest.importorskip("triton.runtime.interpreter")

KERNEL_BACKENDS = ("triton", "ttx")


@pytest.fixture
def non_boolean_masks(monkeypatch):
    """(kernel file:line, numpy dtype) of every load/store whose mask is not boolean."""
    import traceback

    found = []

    def probe(name, mask_index):
        orig = getattr(interpreter.InterpreterBuilder, name)

        def wrapper(self, *args):
            mask = args[mask_index]
            if mask.data.dtype != np.bool_:
                where = next((f"{fr.filename.rsplit('/', 2)[-2]}/{fr.filename.rsplit('/', 1)[-1]}:{fr.lineno}"
                              for fr in reversed(traceback.extract_stack()) if "mojo_opset_" in fr.filename), "?")
                found.append((where, str(mask.data.dtype)))
            return orig(self, *args)
        monkeypatch.setattr(interpreter.InterpreterBuilder, name, wrapper)
    probe("create_masked_load", 1)
    probe("create_masked_store", 2)
    return found


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_masks_are_boolean(backend, non_boolean_masks, capsys):
    import mojo_opset as mo

    rec = mo.available_backends().get(backend)
    if not rec or not rec["available"]:
        pytest.skip(f"{backend} unavailable here: {rec and rec['reason']}")
    rc = main(["compare", "--backends", backend, "--dtypes", "fp32", "--no-progress",
               "--ops", "gating,permute,experts,combine,forward,quant"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "served by kernel" in out
    assert not non_boolean_masks, sorted(set(non_boolean_masks))
