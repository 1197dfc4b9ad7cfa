"""A training micro-batch's forward and backward, replayed as one CUDA graph.

Why: at small batches a QLoRA step is bound by the host, not the GPU. On an H100 a 7B step of 1 x 512
tokens took 434 ms of Python and kernel launches against 89 ms of GPU kernels (BENCHMARKS.md): each of
the thousands of small launches of a forward and backward costs the CPU more than the GPU. A CUDA graph
records the kernels of one micro-batch once; a replay launches all of them with one call.

What a replay needs (PyTorch's `torch.cuda.graph`, its "whole-network capture"):
- Fixed shapes and addresses. The batch is copied into input tensors that the graph owns. Rows are
  padded on the right to a multiple of PAD tokens (`data.pad_batch`: padding is never a target, and in
  a causal model no real token sees it), so one graph serves every batch of a width. The graphs of all
  widths share one memory pool: they never run at the same time.
- No value read back by the host inside the pass. The loss goes over every position with the masked
  ones counting zero (`loss.causal_lm_loss_sum(select=False)`: selecting the targets gives tensors of
  data-dependent size). The step's scale (1 / its target tokens) is a device scalar written before each
  replay, and the loss is added to a device sum that the step reads once (`take_loss_sum`).
- Gradients added in place. The capture runs with every trainable parameter's .grad already there, so
  autograd's accumulation writes into those tensors, and every replay writes to those addresses again.
  So train.py zeroes them in place and never sets them to None (a replay would then add into freed
  memory and the optimizer would see no gradient: TrainStep checks and refuses).
- Warm kernels. A width's first micro-batch runs eagerly: the Triton autotuners time their kernels
  then, which a capture cannot. Its second is captured and replayed; later ones are replayed. Both
  run inside quant.graph_bound(): kernels may be chosen by their GPU time alone, the launch being
  paid once (on Hopper, a fused 4-bit matmul whose launch costs more host time than its GPU time).
- Random numbers. A random op in a graph draws from the generator's seed and offset at each replay, so
  train.seed_step still decides them, and an eager pass and a replay from the same state draw the same.
  LoRA's dropout draws one seed per forward and hashes its masks from it (dropout.py), so gradient
  checkpointing makes the same masks again when it recomputes a block. A module's own nn.Dropout would
  need checkpointing to save and restore the generator's state, which a capture cannot do: graphs_ok
  refuses that combination.

Memory: the shared pool keeps the activations of the largest captured pass for good, and a new width's
first (eager) pass needs its own on top: up to one more pass's activations at the peak, against eager
training (--no-cuda-graphs); small with gradient checkpointing. The gradients stay allocated between
steps (eager training frees them): 40M float32 numbers, 0.15 GiB, for a 7B model at r = 16.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import data
import quant
from dropout import Seed

PAD = 64  # rows are padded to a multiple of this many tokens: one graph per width


def padded_width(T: int, max_width: int = 0) -> int:
    """The width a micro-batch of T tokens a row runs at under graphs: T rounded up to a multiple of PAD,
    but not past max_width (the longest a batch can be, if known) unless T itself is longer."""
    return max(T, min(-(-T // PAD) * PAD, max_width or T + PAD))


def graphs_ok(model: nn.Module, device: str, world: int) -> tuple[bool, str]:
    """Whether train.py can replay this model's micro-batches as CUDA graphs, and if not, why."""
    if not str(device).startswith("cuda"):
        return False, "CUDA graphs need a CUDA device"
    if world > 1:
        return False, "CUDA graphs are not used under torchrun (DDP's gradient hooks run eagerly)"
    if getattr(model, "gradient_checkpointing", False):
        # A recomputed block must draw the forward's masks again. LoRA's dropout hashes them from the
        # model's seed (dropout.py); an nn.Dropout would need the generator's saved state, and an
        # adapter made alone (not by lora.add_lora) draws a new seed at each of its own calls.
        # (Outside a graph, checkpoint's restored generator state covers both.)
        for m in model.modules():
            if isinstance(m, nn.Dropout) and m.p > 0:
                return False, ("CUDA graphs cannot replay gradient checkpointing of a model with nn.Dropout (the "
                               "recomputation must redraw the forward's masks from the generator's saved state)")
            if isinstance(getattr(m, "seed", None), Seed) and m.seed.owner() is not model:
                return False, ("CUDA graphs cannot replay gradient checkpointing of LoRA adapters that draw "
                               "their own dropout seed (use lora.add_lora on the whole model)")
    return True, ""


class TrainStep:
    """step(batch, scale): forward and backward of one micro-batch, its gradients times `scale` added to
    the parameters' .grad and its loss sum to a device total (`take_loss_sum`).

    loss_fn(model, batch, select=...) -> (loss sum, target count) is train.forward_loss. graphs=False
    runs every micro-batch eagerly as given (CPU, torchrun, or by choice); graphs=True pads it to a
    multiple of PAD tokens (at most max_width unless longer) and replays one CUDA graph per shape.
    """

    def __init__(self, model: nn.Module, loss_fn, graphs: bool, max_width: int = 0):
        self.model, self.loss_fn, self.use_graphs, self.max_width = model, loss_fn, graphs, max_width
        device = next(model.parameters()).device
        if graphs:
            ok, why = graphs_ok(model, device, world=1)
            if not ok:
                raise ValueError(why)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grads: list[torch.Tensor] = []  # the .grad tensors the graphs add into (set at the first capture)
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        self.scale = torch.ones((), dtype=torch.float32, device=device)
        self.inputs: dict[tuple, dict[str, torch.Tensor]] = {}  # shape -> the graph's input tensors
        self.graphs: dict[tuple, torch.cuda.CUDAGraph | None] = {}  # None: seen once, run eagerly
        self.pool = None  # the memory pool all graphs share

    def __call__(self, batch: dict[str, torch.Tensor], scale: float):
        self.scale.fill_(scale)
        if not self.use_graphs:
            self._pass({k: v.to(self.loss_sum.device) for k, v in batch.items()}, select=True)
            return
        batch = {k: v for k, v in batch.items() if k != "attention_mask"}  # (not a model input)
        batch = data.pad_batch(batch, padded_width(batch["input_ids"].shape[1], self.max_width))
        key = tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()))
        if key not in self.inputs:
            self.inputs[key] = {k: torch.empty_like(v, device=self.loss_sum.device) for k, v in batch.items()}
        inputs = self.inputs[key]
        for k, v in batch.items():  # from pinned memory the copies run in the stream's order, async
            inputs[k].copy_(v.pin_memory() if v.device.type == "cpu" else v, non_blocking=True)
        with torch.cuda.device(self.loss_sum.device):  # (capture and replay on the model's GPU)
            if key not in self.graphs:  # first of its shape: eagerly (the autotuners time their kernels)
                with quant.graph_bound():  # the kernels the capture will take
                    self._pass(inputs, select=False)
                self.graphs[key] = None
                return
            if not self.grads:  # the first capture: from now on these tensors take the gradients
                for p in self.params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                self.grads = [p.grad for p in self.params]
            if any(p.grad is not g for p, g in zip(self.params, self.grads)):
                raise RuntimeError("CUDA graphs add into the .grad tensors they were captured with: zero the "
                                   "gradients in place (optimizer.zero_grad(set_to_none=False)), never replace them")
            if self.graphs[key] is None:  # second of its shape: capture, then replay to run it
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool), quant.graph_bound():
                    self._pass(inputs, select=False)
                self.pool = graph.pool()
                self.graphs[key] = graph
            self.graphs[key].replay()

    def _pass(self, inputs: dict[str, torch.Tensor], select: bool):
        """The loss, the backward of loss x scale, the loss added to the sum: what a graph holds (with
        select=False: the loss over every position, no size that depends on the data)."""
        loss, _ = self.loss_fn(self.model, inputs, select=select)
        backward(loss * self.scale)
        self.loss_sum += loss.detach()

    def take_loss_sum(self) -> float:
        """The loss summed since the last call (waits for the GPU), and the sum reset."""
        total = self.loss_sum.item()
        self.loss_sum.zero_()
        return total


def backward(loss: torch.Tensor):
    """loss.backward(), run by this thread. On CUDA, autograd otherwise runs the backward in a thread of
    its own, and every Python step of it (the 4-bit layers' backward, the launchers of their kernels)
    then costs more: a 7B layer's forward and backward took 820 us of host time that way on the H100,
    500 us this way (BENCHMARKS.md). At small batches the host sets the pace of a step."""
    with torch.autograd.set_multithreading_enabled(False):
        loss.backward()
