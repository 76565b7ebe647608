"""Router training helpers: hand-computed values, gradients, the global variant over gloo."""
import math

import pytest
import torch

from mojo_opset import losses


def test_load_balancing_loss_hand_computed_and_gradient():
    scores = torch.tensor([[0.7, 0.3], [0.4, 0.6]], requires_grad=True)
    ids = torch.tensor([[0], [0]])
    loss = losses.load_balancing_loss(scores, ids)
    # f = [1, 0], P = [0.55, 0.45] -> 2 * 0.55
    assert loss.item() == pytest.approx(1.1)
    loss.backward()
    # d/ds[t, e] = E * f_e / T
    torch.testing.assert_close(scores.grad, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))


def test_load_balancing_loss_balanced_is_one_and_hf_convention():
    E, K, T = 4, 2, 8
    scores = torch.full((T, E), 1 / E)
    ids = torch.tensor([[0, 1], [2, 3]] * 4)
    assert losses.load_balancing_loss(scores, ids).item() == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    scores = torch.softmax(torch.randn(T, E, generator=g), -1)
    ids = scores.topk(K, dim=-1).indices
    # Hugging Face counts f per token (one-hot summed over the K slots): K times this loss
    hf = E * sum((ids == e).any(-1).float().mean() * scores[:, e].mean() for e in range(E))
    torch.testing.assert_close(K * losses.load_balancing_loss(scores, ids), hf)


def test_sequence_loss_hand_computed():
    # one sequence of 2 tokens, E=2, K=1, sigmoid-like scores normalised per token
    scores = torch.tensor([[0.6, 0.2], [0.3, 0.3]], requires_grad=True)
    ids = torch.tensor([[0], [1]])
    loss = losses.sequence_load_balancing_loss(scores, ids, seq_len=2)
    # s' = [[.75, .25], [.5, .5]]; P = [.625, .375]; f = E/(K*S) * [1, 1] = [1, 1]
    assert loss.item() == pytest.approx(1.0)
    ids = torch.tensor([[0], [0]])
    assert losses.sequence_load_balancing_loss(scores, ids, seq_len=2).item() == pytest.approx(2 * 0.625)
    losses.sequence_load_balancing_loss(scores, ids, seq_len=2).backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()


def test_sequence_loss_is_mean_of_per_sequence_switch_losses():
    g = torch.Generator().manual_seed(1)
    B, S, E, K = 3, 5, 6, 2
    scores = torch.softmax(torch.randn(B * S, E, generator=g), -1)
    ids = scores.topk(K, -1).indices
    want = sum(losses.load_balancing_loss(scores[b * S:(b + 1) * S], ids[b * S:(b + 1) * S]) for b in range(B)) / B
    torch.testing.assert_close(losses.sequence_load_balancing_loss(scores, ids, S), want)
    with pytest.raises(ValueError, match="seq_len must divide"):
        losses.sequence_load_balancing_loss(scores, ids, 4)


def test_router_z_loss():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64, requires_grad=True)
    z = losses.router_z_loss(logits)
    assert z.item() == pytest.approx(2.5 * math.log(2.0) ** 2)
    assert torch.autograd.gradcheck(losses.router_z_loss, (logits,))
    assert losses.router_z_loss(logits.detach().to(torch.bfloat16)).dtype == torch.float32


def test_expert_bias_update():
    bias = torch.zeros(4)
    out = losses.expert_bias_update(bias, torch.tensor([4, 0, 2, 2], dtype=torch.int32), 0.01)
    assert out is bias
    torch.testing.assert_close(bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    with pytest.raises(ValueError, match="tokens_per_expert must have shape"):
        losses.expert_bias_update(bias, torch.zeros(3), 0.01)
    with pytest.raises(ValueError, match="rate"):
        losses.expert_bias_update(bias, torch.zeros(4), -1.0)


def test_global_loss_single_process_equals_local():
    g = torch.Generator().manual_seed(2)
    scores = torch.softmax(torch.randn(7, 5, generator=g), -1)
    ids = scores.topk(2, -1).indices
    torch.testing.assert_close(losses.global_load_balancing_loss(scores, ids),
                               losses.load_balancing_loss(scores, ids))


def test_bad_inputs():
    with pytest.raises(ValueError, match="one row per token"):
        losses.load_balancing_loss(torch.rand(3, 4), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="integer dtype"):
        losses.load_balancing_loss(torch.rand(3, 4), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        losses.router_z_loss(torch.rand(3))


@pytest.mark.parametrize("bad", [4, 9, -1])
def test_ids_out_of_range_name_the_argument(bad):
    """An id outside [0, E) is an error naming topk_ids and the range (was an IndexError from
    index_add, and in the sequence loss could count for another sequence's expert)."""
    scores = torch.rand(4, 4)
    ids = torch.tensor([[0, 1], [2, 3], [1, bad], [3, 0]])
    msg = r"topk_ids must lie in \[0, 4\)"
    with pytest.raises(ValueError, match=msg):
        losses.load_balancing_loss(scores, ids)
    with pytest.raises(ValueError, match=msg):
        losses.sequence_load_balancing_loss(scores, ids, 2)
    with pytest.raises(ValueError, match=msg):
        losses.global_load_balancing_loss(scores, ids)
    with pytest.raises(ValueError, match=msg):
        losses.expert_counts(ids, 4)
    ok = ids.clamp(0, 3)
    assert losses.expert_counts(ok, 4).sum() == 8
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        losses.expert_counts(ok, 0)
    with pytest.raises(TypeError, match="topk_ids must have an integer dtype"):
        losses.expert_counts(ok.float(), 4)


def _global_worker(rank, world, path, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(10 + rank)
        T = 4 + 2 * rank   # ranks hold different token counts
        scores = torch.softmax(torch.randn(T, 6, generator=g), -1).requires_grad_(True)
        ids = scores.topk(2, -1).indices
        loss = losses.global_load_balancing_loss(scores, ids)
        loss.backward()
        torch.save({"scores": scores.detach(), "ids": ids, "loss": loss.detach(), "grad": scores.grad}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_global_loss_all_reduces_counts(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_global_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "res")), nprocs=world)
    res = [torch.load(f"{tmp_path / 'res'}.{r}") for r in range(world)]
    all_ids = torch.cat([r["ids"] for r in res])
    f = torch.bincount(all_ids.reshape(-1), minlength=6).float() / all_ids.numel()
    for r in res:
        want = 6 * (f * r["scores"].mean(0)).sum()
        torch.testing.assert_close(r["loss"], want)
        torch.testing.assert_close(r["grad"], (6 * f / r["scores"].shape[0]).expand_as(r["grad"]))
