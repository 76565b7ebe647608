"""Op identifiers shared by the dispatcher, the backends and the tools."""
MOE_GATING = "moe_gating"
MOE_PERMUTE = "moe_permute"
MOE_EXPERTS = "moe_experts"
MOE_COMBINE = "moe_combine"
MOE_FORWARD = "moe_forward"
QUANT_MOE_FORWARD = "quant_moe_forward"

OPS = (MOE_GATING, MOE_PERMUTE, MOE_EXPERTS, MOE_COMBINE, MOE_FORWARD, QUANT_MOE_FORWARD)


def env_name(op: str) -> str:
    """``moe_gating`` -> ``MOJO_BACKEND_MOE_GATING``."""
    return "MOJO_BACKEND_" + op.upper()

# Canonical keyword arguments each op's OpImpl.reasons()/forward() receives (after the core has
# validated and normalised the public call).  All index tensors are int32 unless stated.
#
# moe_gating(logits, top_k, score_func, route_norm, route_scale, expert_bias, num_expert_groups,
#            num_limited_groups, group_score, forced_expert_ids)
#     logits [T, E] (fp32 when router_dtype=fp32, else the input dtype); expert_bias [E] fp32 or None;
#     num_limited_groups an int (== num_expert_groups when not limiting); forced_expert_ids [T, K]
#     int64 on logits' device, validated, or None.
#     -> (topk_ids int32 [T, K], topk_weights fp32 [T, K], scores fp32 [T, E])
#     Backends need not be differentiable: when logits require grad the core rebuilds
#     topk_weights and scores from the returned ids with the reference formulas.
# moe_permute(x, topk_ids, num_experts, align)
#     x [T, H]; topk_ids int32 [T, K]; align in {1, 8, 16, 32, 64, 128}
#     -> (permuted_x [R, H], tokens_per_expert int32 [E], group_ends int32 [E], row_src int32 [R],
#         pair_row int32 [T*K])
#     R = T*K when align == 1 else T*K + E*(align-1) (worst case, no host sync).  Rows are ordered by
#     expert, stable in the flat pair index p = t*K + j; expert e's rows start at
#     group_ends[e-1] (0 for e=0), its group padded to a multiple of align; group_ends is the
#     inclusive cumulative sum of padded counts (the `offs` of torch._grouped_mm).  row_src[r] = p
#     for a real row, -1 for padding and for rows past group_ends[-1]; those rows of permuted_x are
#     zero.  pair_row[p] = r, the permuted row of pair p.
# moe_experts(permuted_x, group_ends, w13, w2, activation)
#     -> y [R, H] in permuted_x's dtype; y rows past group_ends[-1] are zero.
# moe_combine(expert_out, pair_row, topk_weights, num_tokens)
#     -> out [T, H] in expert_out's dtype: out[t] = sum_j w[t, j] * expert_out[pair_row[t*K+j]], fp32 acc.
# moe_forward(x, topk_ids, topk_weights, w13, w2, activation)
#     -> routed-expert output [T, H] in x's dtype (= combine(experts(permute(x)))); shared experts are
#     added by the core.
# quant_moe_forward(x, topk_ids, topk_weights, qexperts, activation)
#     qexperts: mojo_opset.QuantizedExperts -> [T, H] in x's dtype.
