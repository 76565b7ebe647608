"""The original mojo_opset's documented usage, run against the compatibility classes.

These follow the original's accuracy test-suite (its operator tests for MoE, quantized MoE and router
replay), the way its users call the classes: the backend under test comes from ``MOJO_BACKEND`` at
construction, the reference from ``Cls._registry.get("torch")``, weights are shared through
``load_state_dict`` and ``forward_diff_with`` compares the two.  Sizes are small and the dtypes fp32 /
fp16 so the Triton kernels run in the interpreter on a CPU (bf16 dots are wrong there).
"""
import pytest
import torch
import torch.nn as nn

import mojo_opset as mo
from mojo_opset import (MojoExperts, MojoMoE, MojoMoECombine, MojoMoEDispatch, MojoMoEGating, MojoQuantExperts,
                        MojoQuantMoE)

KERNEL_BACKENDS = [n for n in ("ttx", "triton") if mo.available_backends().get(n, {}).get("available")]
pytestmark = pytest.mark.skipif(not KERNEL_BACKENDS, reason="no kernel backend available (Triton interpreter off)")


@pytest.fixture(params=KERNEL_BACKENDS or ["none"])
def backend(request, monkeypatch):
    monkeypatch.setenv("MOJO_BACKEND", request.param)    # the original's way of choosing the backend
    mo.reset_stats()
    return request.param


def _kernel_ran(backend):
    return any(k.endswith(f"/{backend}/kernel") for k in mo.explain()["served"])


@pytest.mark.parametrize("num_experts, top_k, hidden_size, intermediate_size, num_tokens", [(8, 2, 64, 32, 16)])
@pytest.mark.parametrize("dtype", [torch.float32])
def test_experts(backend, num_experts, top_k, hidden_size, intermediate_size, num_tokens, dtype):
    torch.manual_seed(0)
    # Note: use 2 * num_experts to mimic EP scenarios
    expert_indices = torch.randint(0, num_experts * 2, (num_tokens, top_k))
    token_count = torch.bincount(expert_indices.flatten(), minlength=num_experts)[:num_experts].to(torch.int32)
    total_tokens = int(token_count.sum().item())
    input_fp = torch.randn(total_tokens, hidden_size, dtype=dtype)

    moe = MojoExperts(num_experts=num_experts, hidden_size=hidden_size, intermediate_size=intermediate_size)
    moe_ref = MojoExperts._registry.get("torch")(num_experts=num_experts, hidden_size=hidden_size,
                                                 intermediate_size=intermediate_size)
    moe, moe_ref = moe.to(dtype), moe_ref.to(dtype)
    for p in moe_ref.parameters():
        nn.init.normal_(p, std=0.02)
    moe.load_state_dict(moe_ref.state_dict())
    assert moe.backend == backend
    moe.forward_diff_with(moe_ref, input_fp, token_count, mixed_tol=True)


@pytest.mark.parametrize("num_experts, top_k, hidden_size, intermediate_size, num_tokens",
                         [(8, 2, 64, 32, 16), (16, 4, 32, 64, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_moe(backend, num_experts, top_k, hidden_size, intermediate_size, num_tokens, dtype):
    torch.manual_seed(0)
    moe = MojoMoE(num_experts=num_experts, top_k=top_k, hidden_size=hidden_size, intermediate_size=intermediate_size)
    moe_ref = MojoMoE._registry.get("torch")(num_experts=num_experts, top_k=top_k, hidden_size=hidden_size,
                                             intermediate_size=intermediate_size)
    moe, moe_ref = moe.to(dtype), moe_ref.to(dtype)
    moe.gating.gate_weight.data = moe.gating.gate_weight.data.float()
    moe_ref.gating.gate_weight.data = moe_ref.gating.gate_weight.data.float()
    for p in moe_ref.parameters():
        nn.init.normal_(p, std=0.02)
    moe.load_state_dict(moe_ref.state_dict())
    x = torch.rand(num_tokens, hidden_size, dtype=dtype)
    moe.forward_diff_with(moe_ref, x, mixed_tol=True)
    assert _kernel_ran(backend)


@pytest.mark.parametrize("num_experts, top_k, hidden_size, num_tokens", [(16, 4, 64, 32), (32, 8, 32, 16)])
@pytest.mark.parametrize("dtype", [torch.float32])
def test_moe_gating(backend, num_experts, top_k, hidden_size, num_tokens, dtype):
    torch.manual_seed(0)
    moe_gating = MojoMoEGating(hidden_size=hidden_size, num_experts=num_experts, top_k=top_k)
    moe_gating_ref = MojoMoEGating._registry.get("torch")(hidden_size=hidden_size, num_experts=num_experts,
                                                          top_k=top_k)
    for p in moe_gating_ref.parameters():
        nn.init.normal_(p, std=0.02)
    moe_gating.load_state_dict(moe_gating_ref.state_dict())
    assert moe_gating.gate_weight.dtype == torch.float32 and moe_gating_ref.gate_weight.dtype == torch.float32
    x = torch.rand(num_tokens, hidden_size, dtype=dtype)
    moe_gating.forward_diff_with(moe_gating_ref, x, atol=(0, 1e-2), rtol=(0, 1e-2), ptol=(0.999, 1.0))
    assert _kernel_ran(backend)


@pytest.mark.parametrize("num_experts, top_k, hidden_size, num_tokens", [(16, 4, 32, 24), (48, 8, 16, 12)])
@pytest.mark.parametrize("dtype", [torch.float16])
def test_moe_dispatch(backend, num_experts, top_k, hidden_size, num_tokens, dtype):
    torch.manual_seed(0)
    moe_dispatch = MojoMoEDispatch(num_experts=num_experts)
    moe_dispatch_ref = MojoMoEDispatch._registry.get("torch")(num_experts=num_experts)
    hidden_states = torch.rand(num_tokens, hidden_size, dtype=dtype)
    gate_probs = torch.softmax(torch.randn(num_tokens, num_experts), dim=-1)
    top_k_gates, top_k_indices = torch.topk(gate_probs, top_k, dim=-1)
    top_k_gates = (top_k_gates / top_k_gates.sum(dim=-1, keepdim=True)).contiguous()
    top_k_indices = top_k_indices.to(torch.int32).contiguous()

    sorted_hidden_states, tokens_per_expert, sorted_gates, token_indices = moe_dispatch(
        hidden_states, top_k_gates, top_k_indices)
    _, ref_tokens_per_expert, _, _ = moe_dispatch_ref(hidden_states, top_k_gates, top_k_indices)
    torch.testing.assert_close(tokens_per_expert, ref_tokens_per_expert, atol=0, rtol=0)
    torch.testing.assert_close(sorted_hidden_states, hidden_states[token_indices.to(torch.int64)], atol=0, rtol=0)
    # bucket-internal order is not part of the contract: check each bucket as a set
    expert_offsets = torch.cumsum(tokens_per_expert.to(torch.int64), dim=0)
    expert_starts = torch.cat((expert_offsets.new_zeros(1), expert_offsets[:-1]))
    for expert_idx, (start, end) in enumerate(zip(expert_starts.tolist(), expert_offsets.tolist())):
        if start == end:
            continue
        token_slice = token_indices[start:end].to(torch.int64)
        expert_match = top_k_indices[token_slice] == expert_idx
        assert torch.all(expert_match.any(dim=-1))
        gate_pos = expert_match.to(torch.int64).argmax(dim=-1)
        expected_gates = top_k_gates[token_slice, gate_pos].unsqueeze(-1)
        torch.testing.assert_close(sorted_gates[start:end], expected_gates, atol=0, rtol=0)
    assert _kernel_ran(backend)


@pytest.mark.parametrize("num_experts, hidden_size, intermediate_size, tokens_per_expert",
                         [(4, 32, 64, [3, 0, 5, 4]), (8, 64, 32, [2, 1, 0, 3, 4, 0, 5, 2])])
@pytest.mark.parametrize("dtype", [torch.float32])
def test_moe_experts(backend, num_experts, hidden_size, intermediate_size, tokens_per_expert, dtype):
    torch.manual_seed(0)
    moe_experts = MojoExperts(num_experts=num_experts, hidden_size=hidden_size, intermediate_size=intermediate_size)
    moe_experts_ref = MojoExperts._registry.get("torch")(num_experts=num_experts, hidden_size=hidden_size,
                                                         intermediate_size=intermediate_size)
    for p in moe_experts_ref.parameters():
        nn.init.normal_(p, std=0.02)
    moe_experts, moe_experts_ref = moe_experts.to(dtype), moe_experts_ref.to(dtype)
    moe_experts.load_state_dict(moe_experts_ref.state_dict())
    token_count = torch.tensor(tokens_per_expert, dtype=torch.int32)
    sorted_hidden_states = torch.rand(int(token_count.sum().item()), hidden_size, dtype=dtype)
    moe_experts.forward_diff_with(moe_experts_ref, sorted_hidden_states, token_count, mixed_tol=True)


@pytest.mark.parametrize("num_tokens, top_k, hidden_size", [(16, 4, 32), (12, 8, 64)])
@pytest.mark.parametrize("dtype", [torch.float16])
def test_moe_combine(backend, num_tokens, top_k, hidden_size, dtype):
    torch.manual_seed(0)
    moe_combine = MojoMoECombine(multiply_by_gates=True)
    moe_combine_ref = MojoMoECombine._registry.get("torch")(multiply_by_gates=True)
    expanded_tokens = num_tokens * top_k
    output_buffer = torch.zeros(num_tokens, hidden_size, dtype=dtype)
    expert_outputs = torch.randn(expanded_tokens, hidden_size, dtype=dtype)
    sorted_gates = torch.rand(expanded_tokens, 1, dtype=torch.float32)
    token_indices = (torch.arange(num_tokens, dtype=torch.int32).unsqueeze(1).expand(-1, top_k).reshape(-1)
                     .contiguous())
    perm = torch.randperm(expanded_tokens)
    expert_outputs = expert_outputs[perm].contiguous()
    sorted_gates = sorted_gates[perm].contiguous()
    token_indices = token_indices[perm].contiguous()
    moe_combine.forward_diff_with(moe_combine_ref, output_buffer, expert_outputs, sorted_gates, token_indices,
                                  mixed_tol=True)
    assert _kernel_ran(backend)


# --------------------------------------------------------------------------- router replay (pull request #353)

@pytest.mark.parametrize("num_experts, top_k, hidden_size, num_tokens", [(16, 4, 64, 24)])
@pytest.mark.parametrize("dtype", [torch.float32])
def test_moe_gating_forced_expert_ids_matches_topk_route(backend, num_experts, top_k, hidden_size, num_tokens,
                                                         dtype):
    torch.manual_seed(0)
    moe_gating = MojoMoEGating(hidden_size=hidden_size, num_experts=num_experts, top_k=top_k)
    for p in moe_gating.parameters():
        nn.init.normal_(p, std=0.02)
    assert moe_gating.gate_weight.dtype == torch.float32
    x = torch.rand(num_tokens, hidden_size, dtype=dtype)
    top_k_indices, top_k_gates = moe_gating(x)
    forced_indices, forced_gates = moe_gating(x, forced_expert_ids=top_k_indices)
    torch.testing.assert_close(forced_indices, top_k_indices, atol=0, rtol=0)
    torch.testing.assert_close(forced_gates, top_k_gates, atol=1e-5, rtol=1e-5)


def test_moe_gating_forced_expert_ids_gathers_requested_routes(backend):
    torch.manual_seed(0)
    moe_gating = MojoMoEGating(hidden_size=8, num_experts=4, top_k=2)
    for p in moe_gating.parameters():
        nn.init.normal_(p, std=0.02)
    x = torch.rand(3, 8)
    forced_expert_ids = torch.tensor([[0, 1], [2, 3], [3, 0]], dtype=torch.int64)
    forced_indices, forced_gates = moe_gating(x, forced_expert_ids=forced_expert_ids)
    gate_probs = torch.softmax(torch.matmul(x.float(), moe_gating.gate_weight), dim=-1)
    expected_gates = torch.gather(gate_probs, dim=-1, index=forced_expert_ids)
    expected_gates = expected_gates / torch.sum(expected_gates, dim=-1, keepdim=True)
    torch.testing.assert_close(forced_indices, forced_expert_ids.to(torch.int32), atol=0, rtol=0)
    torch.testing.assert_close(forced_gates, expected_gates, atol=1e-5, rtol=1e-5)


def test_moe_gating_forced_expert_ids_negative_one_keeps_topk_route(backend):
    """The original's example of partial replay.  Its rule (slot j keeps natural[j]) and this library's
    (the -1 slots take, in order, the best experts not forced in the row, so no expert repeats) agree
    when the forced ids are the natural ones at their slots (a masked recording); with forced ids
    that displace natural ones, this library's rule is checked (docs/migrating.md)."""
    torch.manual_seed(0)
    moe_gating = MojoMoEGating(hidden_size=8, num_experts=4, top_k=2)
    for p in moe_gating.parameters():
        nn.init.normal_(p, std=0.02)
    x = torch.rand(3, 8)
    top_k_indices, _ = moe_gating(x)
    gate_probs = torch.softmax(torch.matmul(x.float(), moe_gating.gate_weight), dim=-1)

    masked = torch.where(torch.tensor([[True, False], [False, True], [True, False]]), top_k_indices.long(),
                         torch.full((3, 2), -1))
    forced_indices, _ = moe_gating(x, forced_expert_ids=masked)
    expected_indices = torch.where(masked >= 0, masked, top_k_indices.to(torch.int64))     # the original's rule
    torch.testing.assert_close(forced_indices, expected_indices.to(torch.int32), atol=0, rtol=0)

    forced_expert_ids = torch.tensor([[0, -1], [-1, 3], [2, -1]], dtype=torch.int64)
    forced_indices, forced_gates = moe_gating(x, forced_expert_ids=forced_expert_ids)
    order = torch.sort(gate_probs, dim=-1, descending=True, stable=True).indices
    expected = []
    for row, ranked in zip(forced_expert_ids.tolist(), order.tolist()):
        spare = iter(e for e in ranked if e not in row)
        expected.append([e if e >= 0 else next(spare) for e in row])
    expected_indices = torch.tensor(expected)
    expected_gates = torch.gather(gate_probs, dim=-1, index=expected_indices)
    expected_gates = expected_gates / torch.sum(expected_gates, dim=-1, keepdim=True)
    torch.testing.assert_close(forced_indices, expected_indices.to(torch.int32), atol=0, rtol=0)
    torch.testing.assert_close(forced_gates, expected_gates, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_moe_replay_full_and_partial_on_the_backend(backend, dtype):
    """Replay through the whole layer on the backend under test, against the reference."""
    torch.manual_seed(0)
    kw = dict(num_experts=8, top_k=2, hidden_size=32, intermediate_size=64)
    moe, moe_ref = MojoMoE(**kw).to(dtype), MojoMoE._registry.get("torch")(**kw).to(dtype)
    for p in moe_ref.parameters():
        nn.init.normal_(p, std=0.02)
    moe.load_state_dict(moe_ref.state_dict())
    x = torch.rand(12, 32, dtype=dtype)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(12)])
    moe.forward_diff_with(moe_ref, x, forced_expert_ids=ids, mixed_tol=True)
    assert torch.equal(moe.last_topk_ids.long(), ids)
    ids[::2, 1] = -1
    moe.forward_diff_with(moe_ref, x, forced_expert_ids=ids, mixed_tol=True)
    assert torch.equal(moe.last_topk_ids, moe_ref.last_topk_ids)


# --------------------------------------------------------------------------- quantized MoE

def _pack_int4_to_int8_along_output(input):
    input_u8 = input.to(torch.uint8)
    return (((input_u8[..., 1::2, :] & 0x0F) << 4) | (input_u8[..., 0::2, :] & 0x0F)).to(torch.int8)


def _quantize_weight_per_group(weight, quant_group_size, weight_dtype):
    qmax = 7 if weight_dtype == "int4" else 127
    weight_groups = weight.float().split(quant_group_size, dim=-1) if quant_group_size > 0 else [weight]
    scales, quantizeds = [], []
    for weight_group in weight_groups:
        scale = (weight_group.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=1e-12)
        quantizeds.append(torch.clamp(torch.round(weight_group / scale), -qmax - 1, qmax).to(torch.int8))
        scales.append(scale)
    quantized, scale = torch.cat(quantizeds, dim=-1), torch.cat(scales, dim=-1)
    if quant_group_size <= 0:
        scale = scale.squeeze(-1)
    return _pack_int4_to_int8_along_output(quantized) if weight_dtype == "int4" else quantized, scale


def _make_quant_weights(num_experts, hidden_size, intermediate_size, up_quant_group_size, up_weight_dtype,
                        down_quant_group_size, down_weight_dtype):
    up_weight_fp = torch.randn(num_experts, intermediate_size * 2, hidden_size) * 0.01
    down_weight_fp = torch.randn(num_experts, hidden_size, intermediate_size) * 0.01
    up_weight, up_weight_scale = _quantize_weight_per_group(up_weight_fp, up_quant_group_size, up_weight_dtype)
    down_weight, down_weight_scale = _quantize_weight_per_group(down_weight_fp, down_quant_group_size,
                                                                down_weight_dtype)
    return up_weight, up_weight_scale.bfloat16(), down_weight, down_weight_scale.bfloat16()


QUANT_CASES = [(8, 2, 64, 80, 9), (12, 4, 64, 80, 13)]
QUANT_FORMATS = [("int4", 32, "int4", 40), (torch.int8, -1, torch.int8, -1)]


@pytest.mark.parametrize("num_experts, top_k, hidden_size, intermediate_size, num_tokens", QUANT_CASES[:1])
@pytest.mark.parametrize("up_weight_dtype,up_quant_group_size,down_weight_dtype,down_quant_group_size", QUANT_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16])
def test_quant_experts(backend, num_experts, top_k, hidden_size, intermediate_size, num_tokens, up_weight_dtype,
                       up_quant_group_size, down_weight_dtype, down_quant_group_size, dtype):
    torch.manual_seed(0)
    expert_indices = torch.randint(0, num_experts * 2, (num_tokens, top_k))
    token_count = torch.bincount(expert_indices.flatten(), minlength=num_experts)[:num_experts].to(torch.int32)
    input_fp = torch.randn(int(token_count.sum().item()), hidden_size, dtype=dtype)
    fc1_input_smooth_scale = torch.rand(num_experts, hidden_size) + 0.5
    fc2_input_smooth_scale = torch.rand(num_experts, intermediate_size) + 0.5
    up_weight, up_weight_scale, down_weight, down_weight_scale = _make_quant_weights(
        num_experts, hidden_size, intermediate_size, up_quant_group_size, up_weight_dtype, down_quant_group_size,
        down_weight_dtype)
    state_dict = {"up_proj_weight": up_weight, "down_proj_weight": down_weight,
                  "up_proj_weight_scale": up_weight_scale, "down_proj_weight_scale": down_weight_scale,
                  "up_proj_quantize.inv_smooth_scale": 1.0 / fc1_input_smooth_scale,
                  "down_proj_quantize.inv_smooth_scale": 1.0 / fc2_input_smooth_scale}
    kw = dict(num_experts=num_experts, hidden_size=hidden_size, intermediate_size=intermediate_size,
              quant_dtype=torch.int8, up_quant_group_size=up_quant_group_size, up_weight_dtype=up_weight_dtype,
              down_quant_group_size=down_quant_group_size, down_weight_dtype=down_weight_dtype)
    op = MojoQuantExperts(**kw)
    op_ref = MojoQuantExperts._registry.get("torch")(**kw)
    op.load_state_dict(state_dict)
    op_ref.load_state_dict({k: v.clone() for k, v in state_dict.items()})
    op.forward_diff_with(op_ref, input_fp, token_count, mixed_tol=True)


@pytest.mark.parametrize("num_experts, top_k, hidden_size, intermediate_size, num_tokens", QUANT_CASES)
@pytest.mark.parametrize("up_weight_dtype,up_quant_group_size,down_weight_dtype,down_quant_group_size", QUANT_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16])
def test_quant_moe(backend, num_experts, top_k, hidden_size, intermediate_size, num_tokens, up_weight_dtype,
                   up_quant_group_size, down_weight_dtype, down_quant_group_size, dtype):
    hidden_states = torch.randn(num_tokens, hidden_size, dtype=dtype)
    gate_weight = torch.randn(hidden_size, num_experts, dtype=torch.float32) * 0.2
    fc1_input_smooth_scale = torch.rand(num_experts, hidden_size) + 0.5
    fc2_input_smooth_scale = torch.rand(num_experts, intermediate_size) + 0.5
    up_weight, up_weight_scale, down_weight, down_weight_scale = _make_quant_weights(
        num_experts, hidden_size, intermediate_size, up_quant_group_size, up_weight_dtype, down_quant_group_size,
        down_weight_dtype)
    state_dict = {"gating.gate_weight": gate_weight, "experts.up_proj_weight": up_weight,
                  "experts.down_proj_weight": down_weight, "experts.up_proj_weight_scale": up_weight_scale,
                  "experts.down_proj_weight_scale": down_weight_scale,
                  "experts.up_proj_quantize.inv_smooth_scale": 1.0 / fc1_input_smooth_scale,
                  "experts.down_proj_quantize.inv_smooth_scale": 1.0 / fc2_input_smooth_scale}
    kw = dict(num_experts=num_experts, top_k=top_k, hidden_size=hidden_size, intermediate_size=intermediate_size,
              quant_dtype=torch.int8, up_quant_group_size=up_quant_group_size, up_weight_dtype=up_weight_dtype,
              down_quant_group_size=down_quant_group_size, down_weight_dtype=down_weight_dtype)
    op = MojoQuantMoE(**kw)
    op_ref = MojoQuantMoE._registry.get("torch")(**kw)
    op.load_state_dict(state_dict)
    op_ref.load_state_dict({k: v.clone() for k, v in state_dict.items()})
    op.forward_diff_with(op_ref, hidden_states, mixed_tol=True)
    assert _kernel_ran(backend)
