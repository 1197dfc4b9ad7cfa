"""graph_step.py: a micro-batch's forward and backward replayed as a CUDA graph.

CPU: the padding a graph's fixed shapes need changes nothing a real token computes (the unpadded
forward is the reference), and the eager step adds the loss and gradient train.forward_loss gives.
GPU: an eager pass, a capture and a replay of the same batch from the same RNG state give the same
loss and gradients bit for bit (dropout on, with and without checkpointing, with the pointwise
functions compiled or not), into the same .grad tensors, and they match the eager path that selects
the target tokens (pointwise functions not compiled; compiled, both are compared with float32);
graphs_ok refuses what a graph cannot replay.
"""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import train  # noqa: E402
from generate import DEFAULT_MODEL, build_model  # noqa: E402
from graph_step import TrainStep, graphs_ok, padded_width  # noqa: E402
from lora import LoRALinear, add_lora  # noqa: E402
from model import load_tokenizer  # noqa: E402


def alpaca_batches(pack: bool, batch_size: int = 3, max_len: int = 100):
    tok = load_tokenizer(DEFAULT_MODEL)
    ds, _, _ = data.build_datasets(os.path.join(ROOT, "data", "alpaca_sample.json"), tok, val_frac=0.0,
                                   max_len=max_len, seed=0)
    return data.make_batches(ds, batch_size, max_len, pack=pack, seed=0, epoch=0)


def lora_model(device, dtype, quant="none", dropout=0.0, grad_ckpt=False):
    torch.manual_seed(0)
    model = build_model(DEFAULT_MODEL, device, dtype, quant)
    add_lora(model, r=4, alpha=8, dropout=dropout)
    for m in model.modules():  # B = 0 at init would give A no gradient: make both matter
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    model.gradient_checkpointing = grad_ckpt
    return model.train()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("pack", [False, True])
def test_padding_changes_no_real_token(pack):
    """pad_batch's extra columns: never targets, and the real tokens' hidden states are those of
    the unpadded batch (float32 on the CPU; packed rows keep each document to itself)."""
    model = lora_model("cpu", torch.float32).eval()
    batch = alpaca_batches(pack)[0]
    T = batch["input_ids"].shape[1]
    padded = data.pad_batch(batch, T + 37)
    assert all(v.shape == (batch["input_ids"].shape[0], T + 37) for v in padded.values())
    assert (padded["labels"][:, T:] == data.IGNORE_INDEX).all() and not padded["attention_mask"][:, T:].any()
    for k, v in batch.items():
        assert torch.equal(padded[k][:, :T], v)

    def hidden(b):
        with torch.no_grad():
            return model(b["input_ids"], input_pos=b.get("input_pos"), doc_ids=b.get("doc_ids"), return_hidden=True)
    torch.testing.assert_close(hidden(padded)[:, :T], hidden(batch), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot pad"):
        data.pad_batch(batch, T - 1)


def test_padded_width():
    """One graph per width: widths round up to multiples of 64, never past the longest batch (--max-len)
    unless a batch is longer, and never down."""
    assert [padded_width(t, 512) for t in (1, 64, 65, 500, 512)] == [64, 64, 128, 512, 512]
    assert [padded_width(t, 100) for t in (60, 65, 100, 130)] == [64, 100, 100, 130]
    assert [padded_width(t) for t in (64, 65, 1000)] == [64, 128, 1024]  # (no bound known)


def test_eager_step_adds_the_loss_and_gradient_of_forward_loss():
    """TrainStep without graphs (the CPU, torchrun): scaled gradient and loss sum as forward_loss."""
    model = lora_model("cpu", torch.float32)
    batch = alpaca_batches(pack=True)[0]
    loss, n = train.forward_loss(model, batch)
    (loss / n).backward()
    ref = grads(model)
    model.zero_grad(set_to_none=False)
    step = TrainStep(model, train.forward_loss, graphs=False)
    step(batch, 0.5 / n)
    step(batch, 0.5 / n)  # two halves add up to the whole
    assert step.take_loss_sum() == pytest.approx(2 * loss.item(), rel=1e-6)
    assert step.take_loss_sum() == 0.0
    for k, g in grads(model).items():
        torch.testing.assert_close(g, ref[k], rtol=1e-5, atol=1e-7)


def test_graphs_ok_says_why_not():
    model = lora_model("cpu", torch.float32, dropout=0.1, grad_ckpt=True)
    assert graphs_ok(model, "cpu", 1) == (False, "CUDA graphs need a CUDA device")
    assert not graphs_ok(model, "cuda", 2)[0]
    # LoRA's dropout hashes its masks from a seed (dropout.py): checkpointing recomputes them in a graph
    assert graphs_ok(model, "cuda", 1) == (True, "")
    model.layers[0].drop = torch.nn.Dropout(0.1)  # a module's own nn.Dropout would need the RNG state
    ok, why = graphs_ok(model, "cuda", 1)
    assert not ok and "nn.Dropout" in why
    del model.layers[0].drop
    # an adapter made alone draws its own seed at each call: a recomputed block would draw anew
    q = model.layers[0].self_attn.q_proj
    model.layers[0].self_attn.q_proj = LoRALinear(q.base, r=4, alpha=8, dropout=0.1)
    ok, why = graphs_ok(model, "cuda", 1)
    assert not ok and "add_lora" in why
    model.gradient_checkpointing = False
    assert graphs_ok(model, "cuda", 1) == (True, "")
    with pytest.raises(ValueError, match="need a CUDA device"):  # TrainStep asks too
        TrainStep(model, train.forward_loss, graphs=True)


@pytest.mark.cuda
@pytest.mark.parametrize("quant,dropout,grad_ckpt,compiled", [
    ("nf4", 0.1, False, False), ("nf4", 0.0, True, False), ("nf4", 0.1, True, False), ("none", 0.1, False, False),
    # compiled: train.py's default under graphs (model.compile_pointwise), 16-bit base weights, so that
    # the float32 reference below can hold the bf16 model's very weights (float32 NF4 dequantizes
    # without bf16's rounding)
    ("none", 0.1, True, True)])
def test_gpu_eager_capture_and_replay_agree(quant, dropout, grad_ckpt, compiled, monkeypatch):
    import model as M
    monkeypatch.setattr(M, "POINTWISE", dict(M.EAGER_POINTWISE))  # (compile_pointwise swaps these in place)
    M.compile_pointwise(compiled)
    assert (M.POINTWISE["rms_norm"] is not M.rms_norm) == compiled
    model = lora_model("cuda", torch.bfloat16, quant, dropout, grad_ckpt)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = alpaca_batches(pack=True, batch_size=4, max_len=128)
    batch = batches[0]
    n = int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())
    step = TrainStep(model, train.forward_loss, graphs=True, max_width=128)
    runs = []
    for i in range(4):  # eager, capture + replay, replay, replay after another shape's eager pass
        if i == 3:  # two rows: another shape, run eagerly between the replays
            step({k: v[:2] for k, v in batches[1].items()}, 1.0)
            step.take_loss_sum()
        model.zero_grad(set_to_none=False)
        torch.manual_seed(1234)  # train.seed_step: the same dropout masks every time
        step(batch, 1.0 / n)
        runs.append((step.take_loss_sum(), grads(model), [p.grad.data_ptr() for p in params]))
    assert len(step.graphs) >= 1 and step.pool is not None
    model.zero_grad(set_to_none=True)  # what a replay cannot add into: refused, not silently lost
    with pytest.raises(RuntimeError, match="set_to_none=False"):
        step(batch, 1.0 / n)
    loss0, g0, ptrs0 = runs[0]
    for loss, g, ptrs in runs[1:]:
        assert loss == loss0 and ptrs == ptrs0  # the replay wrote into the same .grad tensors
        for k in g0:
            assert torch.equal(g[k], g0[k]), k

    # the eager path that selects the targets (and does not pad), with the eager pointwise functions
    M.compile_pointwise(False)
    loss_e, ge = eager_step(model, batch, n)
    assert loss_e == pytest.approx(loss0, rel=1e-2)
    if not compiled:  # the same numbers but for the padding and the loss's order of summation
        assert relative_difference(g0, ge) < 2e-2
    else:
        # The fused kernels round differently (float32 inside, bf16 once at the end): on this model their
        # gradients are about 4% from eager bf16's, as far as either is from float32's (BENCHMARKS.md,
        # thirty-second session). So measure both against the float32 computation of the same model
        # (the same dropout masks, the bf16 model's frozen weights): compiled must be as accurate as eager.
        ref = lora_model("cuda", torch.float32, quant, dropout, grad_ckpt)
        for p in ref.parameters():
            if not p.requires_grad:  # (the adapters are float32 in both)
                p.data = p.data.bfloat16().float()
        _, g32 = eager_step(ref, batch, n)
        err_compiled, err_eager = relative_difference(g0, g32), relative_difference(ge, g32)
        print(f"against float32: compiled {err_compiled:.2e}, eager {err_eager:.2e}")
        assert err_compiled < 1.25 * err_eager


def eager_step(model, batch, n):
    """Loss per target token and gradients of one eager TrainStep, with the dropout masks of seed 1234."""
    model.zero_grad(set_to_none=False)
    torch.manual_seed(1234)
    step = TrainStep(model, train.forward_loss, graphs=False)
    step(batch, 1.0 / n)
    return step.take_loss_sum(), grads(model)


def relative_difference(g, ref):
    """|g - ref| / |ref| over all the tensors of two dicts together (gradients, adapters), in float64."""
    num = sum((g[k].double() - ref[k].double()).norm() ** 2 for k in ref).sqrt()
    den = sum(ref[k].double().norm() ** 2 for k in ref).sqrt()
    assert den > 0
    return (num / den).item()
