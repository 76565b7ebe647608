"""Build :class:`mojo_opset.MoE` blocks from Hugging Face configs (the families' rules are in
:mod:`.families`)."""
from __future__ import annotations

import torch

from ..modules.moe import MoE


def moe_config_from_hf(config, layer_idx: int | None = None, family: str | None = None) -> MoE.Config:
    """The :class:`MoE.Config` (with ``hidden_size`` set) of one MoE block of a Hugging Face config."""
    return MoE.config_from_hf(config, layer_idx, family=family)


def build_moe(config, layer_idx: int | None = None, *, family: str | None = None, dtype: torch.dtype | None = None,
              device=None, ep_group=None, **overrides) -> MoE:
    """Build the MoE block of layer ``layer_idx`` (None: any MoE layer) of a Hugging Face Mixtral,
    Qwen2-MoE, Qwen3-MoE, DeepSeek-V2 or DeepSeek-V3 config (a config object or its dict).
    ``overrides`` replace top-level :class:`MoE.Config` fields (e.g. ``backend=``, ``aux_loss=``)."""
    return MoE.from_hf_config(config, layer_idx, family=family, dtype=dtype, device=device, ep_group=ep_group,
                              **overrides)
