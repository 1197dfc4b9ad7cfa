"""The chunked cross-entropy against F.cross_entropy on full float64 logits."""

import pytest
import torch

from loss import IGNORE_INDEX, causal_lm_loss_sum, reference_loss_sum


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_loss_and_grad_equal_float64_reference(chunk):
    g = torch.Generator().manual_seed(0)
    B, T, D, V = 3, 11, 16, 50
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a masked prompt
    labels[2, 7:] = IGNORE_INDEX  # padding

    loss, n = causal_lm_loss_sum(hidden, weight, labels, chunk=chunk)
    (grad,) = torch.autograd.grad(loss * 0.5, hidden)

    h2 = hidden.detach().clone().requires_grad_(True)
    ref = reference_loss_sum(h2, weight, labels)
    (ref_grad,) = torch.autograd.grad(ref * 0.5, h2)
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_no_target_tokens_gives_zero_connected_loss():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    loss, n = causal_lm_loss_sum(hidden, torch.randn(10, 8), torch.full((1, 4), IGNORE_INDEX))
    assert n == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(hidden.grad) == 0


def test_trainable_head_is_refused():
    with pytest.raises(ValueError, match="frozen LM head"):
        causal_lm_loss_sum(torch.randn(1, 3, 4), torch.randn(5, 4, requires_grad=True), torch.zeros(1, 3, dtype=torch.long))
