"""Memory semantics on small hand-made tensors (MemAE, Memorizer, RFTM)."""

import pytest
import torch
import torch.nn.functional as F

from mnemo.models.memory import ForgettingMemory, MemAEMemory, MultiRoundMemory, TwinMemory
from mnemo.models.memory.memae import attention_entropy, cosine_similarity, hard_shrink_relu


def test_hard_shrinkage_zeroes_weights_below_lambda_and_keeps_the_rest():
    w = torch.tensor([[0.001, 0.002, 0.0025, 0.3, 0.6965]])
    shrunk = hard_shrink_relu(w, threshold=0.0025)
    assert torch.equal(shrunk[0, :3], torch.zeros(3))
    torch.testing.assert_close(shrunk[0, 3:], w[0, 3:], atol=1e-6, rtol=1e-6)


def test_memae_weights_are_sparse_and_sum_to_one():
    torch.manual_seed(0)
    mem = MemAEMemory(num_slots=20, dim=8, shrink_threshold=0.06, similarity="dot")
    with torch.no_grad():
        mem.weight.copy_(torch.eye(20, 8) * 5)
    z = torch.zeros(3, 8)
    z[:, 0] = 3.0  # strongly similar to slot 0 only
    w = mem.address(z)
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    assert (w < 0.06).sum() > 0, "small weights must have been shrunk"
    assert torch.all((w == 0) | (w >= 0.06 - 1e-6))
    assert torch.all(w.argmax(-1) == 0)


def test_memae_default_lambda_is_one_over_n_and_shrinks_cosine_weights():
    """λ = 1/N; with cosine logits the weights stay near 1/N, so the code's 0.0025 zeroes (almost) none."""
    torch.manual_seed(0)
    mem = MemAEMemory(num_slots=100, dim=16)
    assert mem.shrink_threshold == pytest.approx(0.01)
    w = mem.address(torch.randn(64, 16))
    assert (w == 0).float().mean() > 0.2
    assert MemAEMemory(num_slots=100, dim=16, shrink_threshold=0.0025).address(torch.randn(64, 16)).min() > 0


def test_memae_entropy_is_zero_for_one_hot_and_log_n_for_uniform():
    one_hot = torch.eye(4)
    uniform = torch.full((2, 4), 0.25)
    assert attention_entropy(one_hot).item() < 1e-6
    torch.testing.assert_close(attention_entropy(uniform), torch.log(torch.tensor(4.0)))


def test_memae_cosine_similarity_is_scale_invariant():
    torch.manual_seed(0)
    mem = MemAEMemory(10, 6)
    z = torch.randn(4, 6)
    torch.testing.assert_close(mem.address(z), mem.address(10 * z))


def test_cosine_similarity_matches_normalising_both_sides_values_and_gradients():
    torch.manual_seed(0)
    z = torch.randn(4, 16, requires_grad=True)
    memory = torch.randn(6, 16) * torch.tensor([[3.0], [0.1], [1.0], [0.0], [2.0], [1e-3]])
    memory.requires_grad_(True)  # row 3 is all zeros: F.normalize's eps keeps it at similarity 0
    ours = cosine_similarity(z, memory)
    reference = F.normalize(z, dim=-1) @ F.normalize(memory, dim=-1).t()
    torch.testing.assert_close(ours, reference)
    assert torch.equal(ours[:, 3], torch.zeros(4))
    weights = torch.randn(4, 6)
    grads = torch.autograd.grad((ours * weights).sum(), (z, memory))
    expected = torch.autograd.grad((reference * weights).sum(), (z, memory))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_memorizer_output_is_a_convex_combination_of_last_round_memory():
    torch.manual_seed(0)
    mem = MultiRoundMemory(num_slots=5, dim=7, rounds=3)
    h = torch.randn(6, 7)
    out, attn = mem(h)
    assert torch.all(attn >= 0)
    torch.testing.assert_close(attn.sum(-1), torch.ones(6))
    torch.testing.assert_close(out, attn @ mem.memories[-1])
    # and it lies in the span of M_R: least squares against M_R's rows leaves no residual
    coeffs = torch.linalg.lstsq(mem.memories[-1].detach().t(), out.detach().t()).solution
    torch.testing.assert_close(coeffs.t() @ mem.memories[-1].detach(), out.detach(), atol=1e-5, rtol=1e-4)


def test_memorizer_rounds_follow_eq_2():
    torch.manual_seed(0)
    mem = MultiRoundMemory(num_slots=4, dim=3, rounds=2)
    h = torch.randn(2, 3)
    r1, _ = mem.read(h + h, mem.memories[0])  # H̃_0 = H
    r2, _ = mem.read(r1 + h, mem.memories[1])
    torch.testing.assert_close(mem(h)[0], r2)


def test_rftm_keeps_exactly_k_remembered_slots_when_similarities_are_positive():
    torch.manual_seed(0)
    mem = ForgettingMemory(num_slots=50, dim=4, top_k=15, forget_rate=0.1).train()
    with torch.no_grad():
        mem.weight.abs_()
    h = torch.rand(8, 4) + 0.1  # positive vectors vs positive memory: every cosine > 0
    for _ in range(5):
        w = mem.address(h)
        kept = w > 0
        assert torch.all(kept.sum(-1) == 15)
        torch.testing.assert_close(w.sum(-1), torch.ones(8))
        # the same 5 rows are forgotten for the whole batch, and never selected
        never_used = ~kept.any(0)
        assert never_used.sum() >= 5


def test_rftm_forgets_only_in_training():
    torch.manual_seed(0)
    mem = ForgettingMemory(num_slots=10, dim=3, top_k=4, forget_rate=0.5)
    h = torch.randn(4, 3)
    mem.eval()
    torch.testing.assert_close(mem.address(h), mem.address(h))
    assert mem.forget_gate(h.device).all()
    mem.train()
    assert mem.forget_gate(h.device).sum() == 5


def test_rftm_threshold_drops_negative_similarities_but_never_empties_a_row():
    mem = ForgettingMemory(num_slots=3, dim=2, top_k=3, forget_rate=0.0).eval()
    with torch.no_grad():
        mem.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    w = mem.address(torch.tensor([[1.0, 0.2], [-1.0, -1.0]]))
    assert w[0, 2] == 0 and w[0, 0] > 0 and w[0, 1] > 0  # τ_0 drops the negative cosine
    # second query: every cosine <= 0 except... all negative/zero -> falls back to the best row only
    assert (w[1] > 0).sum() == 1 and w[1].sum() == 1


def test_twin_memory_shapes_and_gradient_to_input():
    torch.manual_seed(0)
    twin = TwinMemory(dim=6, hippocampus=(10, 3, 0.1), cortex=(20, 2, 0.5)).train()
    h = torch.randn(5, 6, requires_grad=True)
    out, w = twin(h)
    assert out.shape == (5, 6) and w.shape == (5, 20)
    out.sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0


def test_rftm_rejects_top_k_larger_than_the_remembered_rows():
    with pytest.raises(ValueError, match="top_k=9"):
        ForgettingMemory(num_slots=10, dim=3, top_k=9, forget_rate=0.5)
