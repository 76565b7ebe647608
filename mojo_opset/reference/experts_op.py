"""The per-expert loop as a ``torch.library`` custom op, so ``torch.compile(fullgraph=True)`` traces
the reference experts.

The loop reads the group sizes on the host, which a graph cannot express; an opaque op whose output
shape follows from its inputs (the fake implementation) and whose backward is a second opaque op
(the SwiGLU gradient formulas, per expert) can.  Eager calls keep the plain loop (cheaper, and
differentiable to any order); compiled graphs call ``torch.ops.mojo_opset.experts_loop``.
"""
import torch
import torch.nn.functional as F

from .experts_loop import experts_loop
from .swiglu import swiglu, swiglu_backward

__all__ = ["experts_loop_op"]


@torch.library.custom_op("mojo_opset::experts_loop", mutates_args=())
def experts_loop_op(permuted_x: torch.Tensor, group_ends: torch.Tensor, w13: torch.Tensor,
                    w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts over expert-sorted rows; see :func:`mojo_opset.reference.experts_loop.experts_loop`."""
    return experts_loop(permuted_x, group_ends, w13, w2)


@experts_loop_op.register_fake
def _(permuted_x, group_ends, w13, w2):
    return permuted_x.new_empty(permuted_x.shape[0], w2.shape[1])


@torch.library.custom_op("mojo_opset::experts_loop_backward", mutates_args=())
def _experts_loop_backward(grad_y: torch.Tensor, permuted_x: torch.Tensor, group_ends: torch.Tensor,
                           w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the loop per expert, with the forward's roundings: h = x W13^T and a = swiglu(h)
    in x's dtype, the SwiGLU derivative in fp32."""
    dtype = permuted_x.dtype
    gx = torch.zeros_like(permuted_x)
    g13 = torch.zeros_like(w13)
    g2 = torch.zeros_like(w2)
    start = 0
    for e, end in enumerate(group_ends.tolist()):
        if end > start:
            xs, gy = permuted_x[start:end], grad_y[start:end].to(dtype)
            w13e, w2e = w13[e].to(dtype), w2[e].to(dtype)
            h = F.linear(xs, w13e)
            a = swiglu(h, dtype)
            ga = gy @ w2e                                         # d a
            g2[e] = (gy.t() @ a).to(w2.dtype)
            gh = swiglu_backward(h, ga).to(dtype)
            gx[start:end] = gh @ w13e
            g13[e] = (gh.t() @ xs).to(w13.dtype)
        start = end
    return gx, g13, g2


@_experts_loop_backward.register_fake
def _(grad_y, permuted_x, group_ends, w13, w2):
    return torch.empty_like(permuted_x), torch.empty_like(w13), torch.empty_like(w2)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_y):
    permuted_x, group_ends, w13, w2 = ctx.saved_tensors
    gx, g13, g2 = _experts_loop_backward(grad_y.contiguous(), permuted_x, group_ends, w13, w2)
    return gx, None, g13, g2


experts_loop_op.register_autograd(_backward, setup_context=_setup_context)
