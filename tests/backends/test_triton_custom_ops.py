"""The triton backend's custom ops: schemas and fake implementations agree with the kernels."""
import pytest
import torch

import mojo_opset as mo

pytestmark = pytest.mark.skipif(not mo.available_backends()["triton"]["available"],
                                reason="triton backend unavailable")


def _inputs(T=6, E=5, K=2, H=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    logits = torch.randn(T, E, generator=g).to(dev)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32).to(dev)
    x = torch.randn(T, H, generator=g).to(dtype).to(dev)
    return logits, ids, x


@pytest.mark.parametrize("align", [1, 16])
def test_opcheck_permute_and_combine(align):
    import mojo_opset_triton.custom_ops as ops

    logits, ids, x = _inputs()
    torch.library.opcheck(ops.moe_permute, (x, ids, 5, align))
    px, _, _, _, pair_row = ops.moe_permute(x, ids, 5, align)
    w = torch.rand(ids.shape, device=x.device)
    torch.library.opcheck(ops.moe_combine, (px, pair_row, w, x.shape[0]))


def test_opcheck_gating():
    import mojo_opset_triton.custom_ops as ops

    logits, ids, _ = _inputs()
    torch.library.opcheck(ops.moe_gating, (logits, None, None, 2, "softmax", True, 1.0, 1, 1, "top2_sum"))
    torch.library.opcheck(ops.moe_gating, (logits, None, ids.long(), 2, "sigmoid", False, 2.5, 1, 1, "max"))
