"""The training loss: next-token cross-entropy over response tokens, without full-vocabulary logits.

For a batch of hidden states h (N tokens x dim) and the frozen LM head W (vocab x dim), the loss is

    L = sum_t [ logsumexp(h_t W^T) - (h_t W^T)[y_t] ]          (summed over target tokens t)
    dL/dh_t = (softmax(h_t W^T) - onehot(y_t)) W

A 7B LLaMA has a 32,000-word vocabulary: the float32 logits of 8 x 512 tokens take 0.5 GB, and
autograd would keep them (and their softmax) until the backward pass. Two savings:
  1. Only positions whose label is not IGNORE_INDEX go through the head (the prompt is masked).
  2. The head runs over chunks of tokens, and since W is frozen the gradient with respect to h is
     computed right there, chunk by chunk: only dL/dh (N x dim, 16-bit) is kept for backward.
This is the idea behind fused linear cross-entropy kernels (e.g. Liger), written in plain PyTorch.

Saving 1 gives tensors whose size depends on the labels' values, which a CUDA graph cannot replay
(graph_step.py): there every position goes through the head and the masked ones count zero
(select=False): the same loss and gradient, a little more work in the head.
"""

from __future__ import annotations

import torch

from data import IGNORE_INDEX  # label of positions that are not targets (the prompt, padding)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_t CE(h_t @ W^T, y_t), computed in chunks of `chunk` tokens; W gets no gradient.
    Tokens whose target is IGNORE_INDEX add 0 to the sum and get a zero gradient."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        acc = torch.promote_types(h.dtype, torch.float32)  # float32 logits for 16-bit inputs
        grad_h = torch.empty_like(h) if h.requires_grad else None
        total = torch.zeros((), dtype=acc, device=h.device)
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start:start + chunk], targets[start:start + chunk]
            keep = yc != IGNORE_INDEX                          # targets (masked tokens count zero)
            yc = yc.clamp(min=0)                               # (any class: its terms are dropped)
            # logsumexp(z) = m + log sum_v exp(z_v - m), m = max_v z_v, written out so that every
            # step after the first works in place: one (chunk, vocab) float32 tensor at a time
            # (torch.logsumexp and an out-of-place softmax would hold three: 0.8 GB at 2048 tokens)
            logits = (hc @ weight.T).to(acc)
            picked = logits.gather(1, yc[:, None]).squeeze(1)  # the target's logit
            m = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(m).exp_()                      # exp(z - m), in place of the logits
            sums = probs.sum(dim=-1)
            # (torch.where, not a product with 0/1: a masked token's inf or NaN must not count)
            total += torch.where(keep, m.squeeze(1) + sums.log() - picked, 0.0).sum()
            if grad_h is not None:
                probs.div_(sums[:, None])                      # the softmax
                probs[torch.arange(len(yc), device=h.device), yc] -= 1.0
                grad_h[start:start + chunk] = probs.masked_fill_(~keep[:, None], 0.0).to(h.dtype) @ weight
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), None, None, None


def causal_lm_loss_sum(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                       chunk: int = 2048, select: bool = True) -> tuple[torch.Tensor, int | None]:
    """(sum of next-token losses, number of target tokens) for hidden (B, T, dim), labels (B, T).

    labels are aligned with the inputs (HF convention): position t predicts labels[t + 1].
    select=False: every position goes through the head, masked ones counting zero; no step waits
    for the GPU (the count is then None: the caller counts on the host).
    """
    if lm_head_weight.requires_grad:
        raise ValueError("the chunked loss assumes a frozen LM head (it computes no gradient for it)")
    targets = labels[:, 1:]
    if not select:
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        return ChunkedLinearCrossEntropy.apply(h, lm_head_weight, targets.reshape(-1), chunk), None
    keep = targets != IGNORE_INDEX
    h = hidden[:, :-1][keep]  # only target positions go through the head
    y = targets[keep]
    n = int(y.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0  # keeps the graph connected (DDP needs every rank to backward)
    return ChunkedLinearCrossEntropy.apply(h, lm_head_weight, y, chunk), n
