"""Load a Hugging Face MoE block's checkpoint tensors into :class:`mojo_opset.MoE`.

Recognised names (relative to the block's prefix, e.g. ``model.layers.3.mlp.``):
router ``gate.weight`` (+ ``gate.bias``), ``gate.e_score_correction_bias`` (DeepSeek-V3; also
``gate.expert_bias``); routed experts either fused (``experts.gate_up_proj`` ``[E, 2I, H]``,
``experts.down_proj`` ``[E, H, I]``, as transformers stores them now) or per expert
(``experts.{e}.w1/w3/w2.weight``, Mixtral; ``experts.{e}.gate_proj/up_proj/down_proj.weight``,
Qwen and DeepSeek); shared experts ``shared_expert.*`` + ``shared_expert_gate.weight`` (Qwen2-MoE)
or ``shared_experts.*`` (DeepSeek), per projection or fused.  Tensors are copied in place (cast to
the parameters' dtype); per-expert matrices are only stacked, gate rows before up rows.
"""
from __future__ import annotations

import torch

_PER_EXPERT = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


class _Source:
    def __init__(self, state_dict, prefix: str):
        self.prefix = prefix
        self.sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.sub

    def take(self, key: str) -> torch.Tensor:
        if key not in self.sub:
            near = sorted(self.sub)[:8]
            raise KeyError(f"checkpoint has no {self.prefix + key!r} (under prefix {self.prefix!r} it has "
                           f"{len(self.sub)} tensors, e.g. {near})")
        self.used.add(key)
        t = self.sub[key]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"checkpoint entry {self.prefix + key!r} is a {type(t).__name__}, not a tensor")
        return t


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"checkpoint tensor {name!r} has shape {list(src.shape)}, "
                         f"the module expects {list(dst.shape)}")
    dst.copy_(src)


def _load_mlp(src: _Source, base: str, w13: torch.Tensor, w2: torch.Tensor) -> None:
    """One SwiGLU MLP (a routed expert's slice or the shared experts) from fused or per-projection tensors."""
    I = w2.shape[-1]
    if src.has(base + "gate_up_proj"):
        _copy(w13, src.take(base + "gate_up_proj"), src.prefix + base + "gate_up_proj")
        _copy(w2, src.take(base + "down_proj"), src.prefix + base + "down_proj")
        return
    names = next((n for n in _PER_EXPERT if src.has(f"{base}{n[0]}.weight")), _PER_EXPERT[1])
    g, u, d = (f"{base}{n}.weight" for n in names)
    _copy(w13[:I], src.take(g), src.prefix + g)
    _copy(w13[I:], src.take(u), src.prefix + u)
    _copy(w2, src.take(d), src.prefix + d)


@torch.no_grad()
def load_hf_state_dict(moe, state_dict, prefix: str = "", strict: bool = True) -> None:
    """Copy one MoE block's tensors from ``state_dict`` (keys ``prefix + name``) into ``moe``.

    Under expert parallelism only the rank's experts are read.  ``strict``: a tensor under the prefix
    that the block does not use is an error (it usually means a wrong prefix or family)."""
    if prefix and not prefix.endswith("."):
        prefix += "."
    src = _Source(state_dict, prefix)
    if not src.sub:
        raise KeyError(f"checkpoint has no tensor under prefix {prefix!r}")
    gate = moe.gate
    _copy(gate.weight, src.take("gate.weight"), prefix + "gate.weight")
    if gate.bias is not None:
        _copy(gate.bias, src.take("gate.bias"), prefix + "gate.bias")
    if gate.expert_bias is not None:
        key = "gate.e_score_correction_bias" if src.has("gate.e_score_correction_bias") else "gate.expert_bias"
        _copy(gate.expert_bias, src.take(key).float(), prefix + key)

    ex = moe.experts
    lo, hi = moe.expert_range
    E = moe.num_experts
    if src.has("experts.gate_up_proj"):
        for key, dst in (("experts.gate_up_proj", ex.gate_up_proj), ("experts.down_proj", ex.down_proj)):
            t = src.take(key)
            if t.dim() != 3 or t.shape[0] != E:
                raise ValueError(f"checkpoint tensor {prefix + key!r} must hold all {E} experts "
                                 f"[{E}, ...], got shape {list(t.shape)}")
            _copy(dst, t[lo:hi], prefix + key)
    else:
        for e in range(lo, hi):
            _load_mlp(src, f"experts.{e}.", ex.gate_up_proj[e - lo], ex.down_proj[e - lo])
        # other ranks' experts are expected in the checkpoint, not unused
        src.used.update(k for k in src.sub if k.startswith("experts."))

    sh = moe.shared_experts
    if sh is not None:
        base = "shared_expert." if any(k.startswith("shared_expert.") for k in src.sub) else "shared_experts."
        _load_mlp(src, base, sh.gate_up_proj, sh.down_proj)
        if sh.shared_gate is not None:
            _copy(sh.shared_gate, src.take("shared_expert_gate.weight"), prefix + "shared_expert_gate.weight")

    unused = sorted(set(src.sub) - src.used)
    if strict and unused:
        raise KeyError(f"checkpoint tensors under {prefix!r} that this MoE block does not use: "
                       f"{[prefix + k for k in unused]} (wrong prefix or family? pass strict=False to ignore)")
