"""quantize_experts on weights that hold no values: an error naming the arguments."""
import pytest
import torch

import mojo_opset as mo


def test_quantize_experts_on_meta_names_the_weights():
    """Meta weights were a RuntimeError from Tensor.item() deep in the value checks."""
    w13, w2 = torch.empty(2, 8, 16, device="meta"), torch.empty(2, 16, 4, device="meta")
    for scheme in mo.QUANT_SCHEMES:
        with pytest.raises(ValueError, match="w13 and w2 are on the meta device: quantize_experts needs their values"):
            mo.quantize_experts(w13, w2, scheme)
