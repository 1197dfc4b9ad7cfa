"""The chunked cross-entropy against a float64 computation written here, token by token."""

import pytest
import torch

from loss import IGNORE_INDEX, causal_lm_loss_sum


def float64_loss(hidden, weight, labels):
    """sum over t with labels[b, t + 1] a target of logsumexp(h[b, t] W^T) - (h[b, t] W^T)[y], in
    float64, one position at a time (the label shift spelled out; loss.py is not used)."""
    h, w = hidden.double(), weight.double()
    total = h.sum() * 0.0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y != IGNORE_INDEX:
                logits = w @ h[b, t]
                total = total + torch.logsumexp(logits, 0) - logits[y]
    return total


@pytest.mark.parametrize("select", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_loss_and_grad_equal_float64_reference(chunk, select):
    """select=False (every position through the head, masked ones zeroed: what a CUDA graph
    replays) gives the same loss and gradient as selecting the targets."""
    g = torch.Generator().manual_seed(0)
    B, T, D, V = 3, 11, 16, 50
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a masked prompt
    labels[2, 7:] = IGNORE_INDEX  # padding

    loss, n = causal_lm_loss_sum(hidden, weight, labels, chunk=chunk, select=select)
    (grad,) = torch.autograd.grad(loss * 0.5, hidden)

    h2 = hidden.detach().clone().requires_grad_(True)
    ref = float64_loss(h2, weight, labels)
    (ref_grad,) = torch.autograd.grad(ref * 0.5, h2)
    assert n == (int((labels[:, 1:] != IGNORE_INDEX).sum()) if select else None)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_bf16_loss_and_grad_close_to_float64():
    """bf16 hidden states and head, as in training: the logits are rounded to bf16 by the matmul
    (relative 2^-8) and then handled in float32, so each token's loss moves by at most twice its
    largest logit rounding; the gradient comes back in bf16."""
    g = torch.Generator().manual_seed(1)
    B, T, D, V = 2, 9, 32, 40
    hidden = (torch.randn(B, T, D, generator=g) * 0.5).to(torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(V, D, generator=g) * 0.5).to(torch.bfloat16)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, :3] = IGNORE_INDEX
    loss, n = causal_lm_loss_sum(hidden, weight, labels, chunk=4)
    (grad,) = torch.autograd.grad(loss, hidden)
    h64 = hidden.detach().double().requires_grad_(True)
    ref = float64_loss(h64, weight, labels)
    (ref_grad,) = torch.autograd.grad(ref, h64)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    logits = h64.detach()[:, :-1] @ weight.double().T                     # (B, T - 1, V)
    rounding = (logits - logits.to(torch.bfloat16).double()).abs().amax(-1)
    targets = labels[:, 1:] != IGNORE_INDEX
    bound = 2 * rounding[targets].sum() + n * 1e-5                         # (+ float32 sums)
    assert abs(loss.double() - ref) <= bound
    # the gradient: bf16 probabilities times W, rounded to bf16 (2^-8 = 0.4% relative each);
    # measured 0.24% in norm
    rel = ((grad.double() - ref_grad).norm() / ref_grad.norm()).item()
    assert rel < 0.02, rel


@pytest.mark.parametrize("select", [True, False])
def test_no_target_tokens_gives_zero_connected_loss(select):
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    loss, n = causal_lm_loss_sum(hidden, torch.randn(10, 8), torch.full((1, 4), IGNORE_INDEX), select=select)
    assert n == (0 if select else None) and loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(hidden.grad) == 0


def test_trainable_head_is_refused():
    with pytest.raises(ValueError, match="frozen LM head"):
        causal_lm_loss_sum(torch.randn(1, 3, 4), torch.randn(5, 4, requires_grad=True), torch.zeros(1, 3, dtype=torch.long))


def test_a_masked_tokens_inf_does_not_reach_the_loss():
    """select=False sends masked positions through the head too; their values must not count, even
    when they are not finite (a product with 0 would give NaN)."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(1, 6, 8, generator=g, requires_grad=True)
    weight = torch.randn(10, 8, generator=g)
    labels = torch.randint(0, 10, (1, 6), generator=g)
    labels[0, :3] = IGNORE_INDEX  # positions 0 and 1 predict masked labels
    with torch.no_grad():
        hidden[0, 1] = float("inf")
    ref, _ = causal_lm_loss_sum(hidden, weight, labels, select=True)
    (ref_grad,) = torch.autograd.grad(ref, hidden)
    loss, _ = causal_lm_loss_sum(hidden, weight, labels, select=False)
    (grad,) = torch.autograd.grad(loss, hidden)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(grad, ref_grad)
