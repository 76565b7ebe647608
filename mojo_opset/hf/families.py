"""MoE block configurations of the Hugging Face model families, each matching its reference code
(router GEMM dtype, score function, top-k normalisation and scaling, group-limited routing, shared
experts): the table is in docs/modules.md."""
from __future__ import annotations

from collections.abc import Mapping

import torch


FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")
# model_type values that share a family's MoE block
_MODEL_TYPES = {f: f for f in FAMILIES} | {"kimi_k2": "deepseek_v3"}
_MISSING = object()


class _Cfg:
    """Uniform read access to a config object or dict, with errors that name the family and key."""

    def __init__(self, config, family: str):
        self.config, self.family = config, family

    def get(self, key: str, default=_MISSING):
        c = self.config
        v = c.get(key, _MISSING) if isinstance(c, Mapping) else getattr(c, key, _MISSING)
        if v is _MISSING:
            if default is _MISSING:
                raise KeyError(f"the {self.family} config has no {key!r}, which the MoE block needs")
            return default
        return v

    def pos_int(self, key: str, default=_MISSING) -> int:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"the {self.family} config's {key!r} must be a positive int, got {v!r}")
        return v


def family_of(config, family: str | None = None) -> str:
    """The MoE family of a config: ``family`` if given, else its ``model_type``."""
    if family is None:
        mt = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
        if mt is None:
            raise ValueError("cannot tell the model family: the config has no model_type; "
                             f"pass family= one of {FAMILIES}")
        family = mt
    if family not in _MODEL_TYPES:
        raise ValueError(f"unsupported MoE family {family!r}; supported: {', '.join(sorted(_MODEL_TYPES))}")
    return _MODEL_TYPES[family]


def is_moe_layer(config, layer_idx: int, family: str | None = None) -> bool:
    """Whether decoder layer ``layer_idx`` has an MoE block (else a dense MLP), per the family's rule."""
    fam = family_of(config, family)
    c = _Cfg(config, fam)
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
        raise ValueError(f"layer_idx must be a non-negative int, got {layer_idx!r}")
    if fam == "mixtral":
        return True
    if fam in ("qwen2_moe", "qwen3_moe"):
        step = c.pos_int("decoder_sparse_step", 1)
        return (layer_idx not in (c.get("mlp_only_layers", None) or []) and c.get("num_experts") > 0
                and (layer_idx + 1) % step == 0)
    if c.get("n_routed_experts", 64 if fam == "deepseek_v2" else 256) is None:
        return False
    first = c.get("first_k_dense_replace", 0 if fam == "deepseek_v2" else 3)
    return layer_idx >= first and layer_idx % c.pos_int("moe_layer_freq", 1) == 0


def _check_act(c: _Cfg) -> None:
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"the {c.family} config's hidden_act is {act!r}; the experts support only SwiGLU (silu)")


def moe_block_spec(config, layer_idx: int | None = None, family: str | None = None) -> dict:
    """The configuration of one MoE block of a Hugging Face config, as plain keyword arguments:
    ``{"num_experts", "hidden_size", "router": Router.Config kwargs, "experts": GroupedExperts.Config
    kwargs, "shared_experts": SharedExperts.Config kwargs or None}`` (``MoE.config_from_hf`` builds
    the :class:`MoE.Config`; this module knows the families, not the module classes)."""
    fam = family_of(config, family)
    if layer_idx is not None and not is_moe_layer(config, layer_idx, fam):
        raise ValueError(f"layer {layer_idx} of this {fam} config is a dense MLP layer, not an MoE block")
    c = _Cfg(config, fam)
    _check_act(c)
    H, K = c.pos_int("hidden_size"), c.pos_int("num_experts_per_tok")
    std = float(c.get("initializer_range", 0.02))
    shared = None
    if fam == "mixtral":
        E, I = c.pos_int("num_local_experts"), c.pos_int("intermediate_size")
        router = dict(top_k=K, score_func="softmax", route_norm=True, router_dtype=None, init_std=std)
    elif fam in ("qwen2_moe", "qwen3_moe"):
        E, I = c.pos_int("num_experts"), c.pos_int("moe_intermediate_size")
        router = dict(top_k=K, score_func="softmax", route_norm=bool(c.get("norm_topk_prob", False)),
                               router_dtype=None, init_std=std)
        if fam == "qwen2_moe":
            I_s = c.get("shared_expert_intermediate_size", 0)
            if I_s:
                shared = dict(intermediate_size=int(I_s), gate=True, init_std=std)
    else:
        E, I = c.pos_int("n_routed_experts"), c.pos_int("moe_intermediate_size")
        n_shared = c.get("n_shared_experts", 2 if fam == "deepseek_v2" else 1)   # the config classes' defaults
        if n_shared:
            shared = dict(intermediate_size=int(n_shared) * I, init_std=std)
        scale = float(c.get("routed_scaling_factor", 1.0 if fam == "deepseek_v2" else 2.5))
        norm = bool(c.get("norm_topk_prob", fam == "deepseek_v3"))
        if fam == "deepseek_v2":
            if c.get("scoring_func", "softmax") != "softmax":
                raise ValueError(f"deepseek_v2 scoring_func must be 'softmax', got {c.get('scoring_func')!r}")
            method = c.get("topk_method", "greedy")
            if method == "greedy":
                G, L = 1, None
            elif method == "group_limited_greedy":
                G, L = c.pos_int("n_group"), c.pos_int("topk_group")
            else:
                raise ValueError(f"deepseek_v2 topk_method must be 'greedy' or 'group_limited_greedy', got {method!r}")
            # DeepSeek-V2's gate either renormalises or scales, never both
            renorm = norm and K > 1
            router = dict(top_k=K, score_func="softmax", route_norm=renorm,
                                   route_scale=1.0 if renorm else scale, num_expert_groups=G,
                                   num_limited_groups=L, group_score="max", router_dtype=torch.float32, init_std=std)
        else:
            if c.get("scoring_func", "sigmoid") != "sigmoid":
                raise ValueError(f"deepseek_v3 scoring_func must be 'sigmoid', got {c.get('scoring_func')!r}")
            method = c.get("topk_method", "noaux_tc")
            if method != "noaux_tc":
                raise ValueError(f"deepseek_v3 topk_method must be 'noaux_tc', got {method!r}")
            G, L = c.pos_int("n_group", 8), c.pos_int("topk_group", 4)
            router = dict(top_k=K, score_func="sigmoid", route_norm=norm, route_scale=scale,
                                   num_expert_groups=G, num_limited_groups=L, group_score="top2_sum",
                                   router_dtype=torch.float32, expert_bias=True, init_std=std)
    return dict(num_experts=E, hidden_size=H, router=router, experts=dict(intermediate_size=I, init_std=std),
                shared_experts=shared)
