"""Fine-tune a (4-bit) LLaMA with LoRA on instruction data: QLoRA in one readable loop.

    python train.py                                   # bundled tiny model + Alpaca sample: half a minute on a CPU
    python train.py --data alpaca.json --model path/to/Llama-2-7b-hf --quant nf4 --out runs/alpaca
    torchrun --nproc_per_node 2 train.py --out runs/ddp ...   # data parallel: 2 GPUs (or 2 CPU processes: --device cpu)

The order follows Stanford Alpaca's train.py: constants, argument dataclasses, data, model, the loop.
What a run saves, and how --resume continues it exactly, is checkpoint.py's. What QLoRA adds (Dettmers
et al. 2023): the frozen base weights are 4-bit NF4 (quant.py), only the LoRA adapters train (lora.py),
computing in bf16 with fp32 adapter weights.

A step's loss is the sum of token losses over its whole accumulation window (all micro-batches, all
processes) over the number of target tokens in it: every response token weighs the same whatever
micro-batch it fell in (not a mean of per-batch means), so the same rows train the same as 1 x 8,
2 x 4 (accumulation) or 2 processes x 4. Resuming repeats the uninterrupted run exactly: the data order
is a function of (seed, epoch), the learning rate of the step, and dropout draws from a generator
reseeded every step from (seed, step, rank); a checkpoint holds the step, the adapters, AdamW's moments.

On one GPU each micro-batch's forward and backward is captured once as a CUDA graph and replayed
(graph_step.py): at small batches the step would otherwise wait for Python's kernel launches. There,
torch.compile fuses the pointwise functions (RMSNorm, rotary, SwiGLU: model.compile_pointwise); the rest
of the model stays plain PyTorch and our kernels.

Left out: paged optimizers, FSDP (the trainable state is small: see README), compiling the whole model,
resuming with another number of processes, evaluation metrics other than the held-out loss.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from checkpoint import Interrupted, StopRequest, check_out, kept, restore_checkpoint, save_or_explain, start_run
from generate import DEFAULT_MODEL, allocation, build_model, check_device, default_dtype, generate_tokens
from graph_step import TrainStep, graphs_ok, padded_width
from lora import add_lora
from loss import causal_lm_loss_sum
from model import compile_pointwise, load_tokenizer, read_args, set_pointwise

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "data", "alpaca_sample.json")


@dataclass
class ModelArguments:
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "model folder (Hugging Face or Meta layout, with tokenizer.model); default: the bundled tiny stories260K, %(default)s"})
    quant: str = field(default="nf4", metadata={"help": "frozen base weights: nf4 (QLoRA), int4, or none (16-bit on GPU, 32-bit on CPU)", "choices": ["nf4", "int4", "none"]})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank r (A is r x in, B is out x r)"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha: the update B A x is scaled by alpha / r"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the adapters' input (masks hashed from a seed per forward: dropout.py)"})
    lora_targets: str = field(default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", metadata={"help": "comma-separated names of the linears that get adapters"})
    grad_ckpt: bool = field(default=False, metadata={"help": "gradient checkpointing: recompute each block in backward (much less activation memory, ~30%% slower)"})


@dataclass
class DataArguments:
    data: str = field(default=DEFAULT_DATA, metadata={"help": "Alpaca JSON (a list of {instruction, input, output}) or JSON Lines (.jsonl); default: the bundled 964-record sample, %(default)s"})
    val_data: str | None = field(default=None, metadata={"help": "held-out file in the same format; default: hold out --val-frac of --data"})
    val_frac: float = field(default=0.02, metadata={"help": "fraction of --data held out when --val-data is not given"})
    max_len: int = field(default=512, metadata={"help": "longest example in tokens; longer ones lose the start of their prompt first, keeping the response"})
    pack: bool = field(default=False, metadata={"help": "pack several examples into each row of --max-len tokens, each attending only to itself (no compute on padding)"})


@dataclass
class TrainingArguments:
    out: str = field(default="runs/alpaca", metadata={"help": "output folder: adapter_model.safetensors + adapter_config.json (PEFT layout), checkpoint.pt, metrics.jsonl"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate of AdamW (the tiny default model learns faster with 2e-3)"})
    epochs: int = field(default=1, metadata={"help": "passes over the training data"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps to run, overriding --epochs (0: run --epochs); the cosine schedule ends there"})
    batch_size: int = field(default=8, metadata={"help": "examples (or packed rows) per micro-batch, per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step (global batch: batch-size x grad-accum x processes)"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warm-up steps before the cosine decay to 0"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on the adapters"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this (0: no clipping)"})
    log_every: int = field(default=1, metadata={"help": "write a metrics line every N steps"})
    eval_every: int = field(default=50, metadata={"help": "held-out loss every N steps, besides step 0 and the end (0: only those)"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps, besides the end and Ctrl-C (0: only those)"})
    samples: int = field(default=3, metadata={"help": "held-out instructions to answer (greedy) at the end"})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "cpu or cuda (under torchrun each process takes cuda:LOCAL_RANK)"})
    seed: int = field(default=42, metadata={"help": "seed of the held-out split, data order, adapter initialization and dropout"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/checkpoint.pt (same data/model/batch flags and number of processes; --lr, --max-steps... may change)"})
    overwrite: bool = field(default=False, metadata={"help": "start afresh even if OUT already holds a checkpoint (that run's checkpoint and adapter are removed once this run has loaded its data and model)"})
    dist_timeout: int = field(default=1800, metadata={"help": "under torchrun: seconds a process waits for the others before failing (instead of hanging)"})
    no_cuda_graphs: bool = field(default=False, metadata={"help": "run every micro-batch eagerly; by default one CUDA GPU replays each micro-batch's forward and backward as a CUDA graph (graph_step.py: much faster at small batches; rows padded to a multiple of 64 tokens; up to one more pass's activations in memory; not under torchrun)"})
    no_compile: bool = field(default=False, metadata={"help": "keep RMSNorm, rotary and SwiGLU as eager PyTorch; by default, under CUDA graphs, torch.compile fuses each into one kernel (model.compile_pointwise: a 7B step 1.2x faster on an H100; the first micro-batches of a run compile them, about 10 s)"})


def parse_args(argv=None):
    """argparse built from the dataclasses above (their help strings are --help's)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for cls in (ModelArguments, DataArguments, TrainingArguments):
        group = p.add_argument_group(cls.__name__)
        for f in dataclasses.fields(cls):
            flag, kw = "--" + f.name.replace("_", "-"), {"default": f.default, "help": f.metadata["help"]}
            if f.type in ("bool", bool):
                group.add_argument(flag, action="store_true", **kw)
            else:
                group.add_argument(flag, type={"int": int, "float": float}.get(f.type, str), choices=f.metadata.get("choices"), **kw)
    ns = vars(p.parse_args(argv))
    for name, least in (("lora_r", 1), ("batch_size", 1), ("grad_accum", 1), ("epochs", 1), ("log_every", 1),
                        ("max_len", 1), ("max_steps", 0), ("warmup_steps", 0), ("eval_every", 0), ("save_every", 0),
                        ("samples", 0)):
        if ns[name] < least:
            p.error(f"--{name.replace('_', '-')} must be at least {least}, got {ns[name]}")
    return [cls(**{f.name: ns[f.name] for f in dataclasses.fields(cls)}) for cls in (ModelArguments, DataArguments, TrainingArguments)]


# --------------------------------------------------------------------------------------------
# Data parallel (torchrun): each rank holds its own 4-bit base and adapters; DDP all-reduces the
# adapter gradients. Plain `python train.py` is world size 1 and creates no process group.
# --------------------------------------------------------------------------------------------

def setup_distributed(device: str, timeout_s: int) -> tuple[int, int, str]:
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    # The timeout bounds every collective too: a rank that hangs fails the others instead of hanging them.
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(seconds=timeout_s))
    return rank, world, device


def all_sum(values: list[float], world: int, device) -> list[float]:
    """Element-wise sum over all ranks (in float64; the identity for one process)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def lr_at(step: int, args: TrainingArguments, total_steps: int) -> float:
    """Linear warm-up to args.lr over warmup_steps, then cosine decay to 0 at total_steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def seed_step(seed: int, step: int, rank: int):
    """Reseed torch (CPU and CUDA) from (seed, step, rank): a resumed run draws the uninterrupted run's
    dropout masks without saving RNG state, and each rank draws its own."""
    torch.manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


def forward_loss(model, batch: dict, select: bool = True) -> tuple[torch.Tensor, int | None]:
    """Sum of target-token losses of one micro-batch, and its number of target tokens (None with
    select=False: every position through the head, masked ones zeroed, as a CUDA graph needs)."""
    raw = model.module if hasattr(model, "module") else model
    hidden = model(batch["input_ids"], input_pos=batch.get("input_pos"), doc_ids=batch.get("doc_ids"), return_hidden=True)
    return causal_lm_loss_sum(hidden, raw.lm_head.weight, batch["labels"], select=select)


@torch.no_grad()
def evaluate(model, batches: data.Batches, device) -> float:
    """Mean loss per target token over the held-out batches."""
    model.eval()
    total, n = 0.0, 0
    for batch in batches:
        loss, k = forward_loss(model, {k: v.to(device) for k, v in batch.items()})
        total, n = total + loss.item(), n + k
    model.train()
    return total / max(n, 1)


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # the process's peak resident memory (Unix; Linux counts KiB, macOS bytes)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)


def train(argv=None):
    model_args, data_args, args = parse_args(argv)
    check_device(args.device)
    rank, world, device = setup_distributed(args.device, args.dist_timeout)
    main = rank == 0
    dtype = default_dtype(device)  # bf16 on GPU, fp32 on CPU
    if dtype == torch.float16:  # generate.py runs such a GPU in fp16; training needs bf16
        cc = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise ValueError(f"{torch.cuda.get_device_name(device)} (compute capability {cc}) has no bf16, "
                         "which training computes in: it needs compute capability 8.0 or more "
                         "(A100, RTX 30xx and newer), or --device cpu")
    check_out(args.out, args.resume, args.overwrite)  # before anything is loaded
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)  # metrics report this run's peak, not the process's

    # ---- data: records -> tokenized examples with masked prompts -> batches -------------------
    model_config = read_args(model_args.model)  # fail here, naming the folder, if it is not a LLaMA checkpoint
    if data_args.max_len > model_config.max_seq_len:
        raise ValueError(f"--max-len {data_args.max_len} exceeds the model's context of {model_config.max_seq_len} tokens")
    targets = tuple(t.strip() for t in model_args.lora_targets.split(","))
    if {"lm_head", "embed_tokens"} & set(targets):
        raise ValueError("--lora-targets: the LM head and the embedding stay frozen here (loss.py computes no gradient "
                         "for the head); choose among the block linears q_proj ... down_proj")
    tokenizer = load_tokenizer(model_args.model)
    train_set, val_set, report = data.build_datasets(data_args.data, tokenizer, val_path=data_args.val_data,
                                                     val_frac=data_args.val_frac, max_len=data_args.max_len, seed=args.seed)
    if main:
        print(report)

    def epoch_batches(epoch: int) -> data.Batches:
        """The epoch's global batches of world x batch_size rows, a pure function of (seed, epoch). Always full
        (a short one could not be split over N ranks; dropping it only then would change the batches)."""
        return data.make_batches(train_set, args.batch_size * world, data_args.max_len, pack=data_args.pack,
                                 seed=args.seed, epoch=epoch, drop_last=True)

    steps_per_epoch = len(epoch_batches(0)) // args.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"{data_args.data}: {len(train_set)} training examples make no full step of batch "
                         f"{args.batch_size} x {args.grad_accum} accumulation x {world} processes")
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    val_batches = data.make_batches(val_set, args.batch_size, data_args.max_len, pack=data_args.pack) if len(val_set) else []

    # ---- model: load (quantizing each block as it arrives), add LoRA, freeze the rest ---------
    torch.manual_seed(args.seed)  # the adapters' initialization, the same on every rank
    model = build_model(model_args.model, device, dtype, model_args.quant)
    add_lora(model, r=model_args.lora_r, alpha=model_args.lora_alpha, dropout=model_args.lora_dropout,
             targets=targets)
    model.gradient_checkpointing = model_args.grad_ckpt
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    ddp_model = model
    if world > 1:
        with warnings.catch_warnings():  # torch 2.13 deprecates broadcast_buffers; its replacement syncs at init
            warnings.simplefilter("ignore", FutureWarning)
            # The 4-bit weights are buffers, made identical on every rank by quantizing: never broadcast them.
            ddp_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None, broadcast_buffers=False)
    args_dict = {**dataclasses.asdict(model_args), **dataclasses.asdict(data_args), **dataclasses.asdict(args)}
    step = restore_checkpoint(args.out, model, optimizer, world, args_dict, device) if args.resume else 0
    saved_step = step if args.resume else None
    if main:
        print(f"trainable LoRA parameters: {sum(p.numel() for p in params):,}; steps {step} -> {total_steps} of "
              f"{args.batch_size} x {args.grad_accum} x {world} sequences; writing to {args.out}")
        if step >= total_steps:
            print(f"nothing to train: the checkpoint is at step {step} (a larger --max-steps or --epochs goes on)")
    os.makedirs(args.out, exist_ok=True)  # (only now: a run refused above leaves no empty folder)
    metrics = start_run(args.out, step if args.resume else None) if main else None
    use_graphs, why_not = graphs_ok(model, device, world)
    use_graphs = use_graphs and not args.no_cuda_graphs
    # Under graphs the step's time is its kernels' time, and eager RMSNorm, rotary and SwiGLU run as ~15
    # elementwise kernels a block that each read and write a whole activation: fuse them. (Eager, the
    # compiled functions' host time costs about what they save: BENCHMARKS.md, thirty-second session.)
    compiled = use_graphs and not args.no_compile
    if main and device.startswith("cuda"):
        print("CUDA graphs: " + ("on (graph_step.py)" if use_graphs else f"off ({why_not or '--no-cuda-graphs'})")
              + ("; pointwise compiled" if compiled else ""))
    micro_step = TrainStep(ddp_model, forward_loss, graphs=use_graphs, max_width=data_args.max_len)

    def log(record: dict):
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()

    if main and val_batches and not args.resume:
        log({"step": 0, "val_loss": evaluate(model, val_batches, device)})  # the baseline: the base model itself

    def out_of_memory_stop(message: str, where: str, evaluating: bool = False) -> torch.cuda.OutOfMemoryError:
        """Save the last completed step, whose adapters and AdamW state are whole, so that nothing is lost (rank 0:
        its state is every rank's; when another rank runs out, rank 0 waits in a collective until torchrun ends
        the job); then the error that says what to change."""
        nonlocal saved_step
        if main and step > (saved_step or 0):
            save_or_explain(args.out, model, optimizer, step, world, args_dict, f" after running out of GPU memory in {where}")
            saved_step = step
        lighter = lighter_flags(model_args.grad_ckpt, use_graphs, evaluating) if step < total_steps else []
        return out_of_memory(message, where, saved_step, args.out, device, lighter)

    # ---- the loop ----------------------------------------------------------------------------
    bar = tqdm(total=total_steps, initial=step, disable=not main, dynamic_ncols=True)
    stop = StopRequest(verbose=main, second_aborts=world == 1)
    epoch, batches = -1, None
    pointwise_before = None
    try:
        pointwise_before = compile_pointwise(compiled)  # (put back at the end: train() may be called again)
        while step < total_steps:
            t0 = time.perf_counter()
            if step // steps_per_epoch != epoch:
                epoch = step // steps_per_epoch
                batches = epoch_batches(epoch)
            first = (step % steps_per_epoch) * args.grad_accum
            # This rank's share of each global batch in the accumulation window (counted on the host).
            window = [data.shard_batch(b, rank, world) for b in batches[first:first + args.grad_accum]]
            n_target, n_tokens = all_sum([sum(float((b["labels"][:, 1:] != data.IGNORE_INDEX).sum()) for b in window),
                                          sum(float(b["attention_mask"].sum()) for b in window)], world, device)
            lr = lr_at(step, args, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            seed_step(args.seed, step, rank)
            oom = None
            try:  # (a failed allocation inside a CUDA graph's capture may surface as another error: not caught)
                for i, batch in enumerate(window):
                    # DDP all-reduces the gradients once per step, in the backward of the last micro-batch.
                    with ddp_model.no_sync() if world > 1 and i < len(window) - 1 else contextlib.nullcontext():
                        # DDP averages gradients over ranks; the factor world turns that into a sum.
                        micro_step(batch, world / max(n_target, 1))
                # (waits for the GPU: the micro-batches' work was only queued); ranks stop together
                loss_sum, stop_asked = all_sum([micro_step.take_loss_sum(), float(stop.asked)], world, device)
            except torch.cuda.OutOfMemoryError as e:  # (stopped below: this traceback holds the pass's activations)
                rows, width = batch["input_ids"].shape
                width = padded_width(width, data_args.max_len) if use_graphs else width
                oom = (str(e), f"step {step + 1}, a micro-batch of {rows} x {width} tokens")
            if oom:
                raise out_of_memory_stop(*oom)
            loss_val = loss_sum / max(n_target, 1)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or math.inf))
            if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
                again = "resume it" if saved_step else "start again"
                raise FloatingPointError(f"loss {loss_val}, gradient norm {grad_norm} at step {step + 1}: stopped before "
                                         f"updating the adapters; {kept(saved_step, args.out)} ({again} with a lower --lr)")
            optimizer.step()
            # In place under CUDA graphs (a graph adds into these tensors); else freed until the next backward.
            optimizer.zero_grad(set_to_none=not use_graphs)
            step += 1

            dt = time.perf_counter() - t0
            if main:
                mem = peak_memory_gib(device)
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tokens / dt:,.0f}", mem=f"{mem:.2f}G")
                bar.update(1)
                if step % args.log_every == 0:
                    log({"step": step, "epoch": epoch, "loss": loss_val, "lr": lr, "grad_norm": grad_norm,
                         "tokens_per_s": n_tokens / dt, "target_tokens": int(n_target), "max_mem_gib": mem})
                if val_batches and ((args.eval_every and step % args.eval_every == 0) or step == total_steps):
                    oom = None
                    try:  # (eager, outside the graphs' memory pool: it can run out where the steps did not)
                        val = evaluate(model, val_batches, device)
                    except torch.cuda.OutOfMemoryError as e:
                        oom = (str(e), f"the held-out evaluation after step {step}")
                    if oom:
                        raise out_of_memory_stop(*oom, evaluating=True)
                    log({"step": step, "val_loss": val})
                    tqdm.write(f"step {step}: loss {loss_val:.4f}, val_loss {val:.4f}")
            if (args.save_every and step % args.save_every == 0) or step == total_steps or stop_asked:
                if main:  # the other ranks go on to the next all_sum, which waits for rank 0
                    save_or_explain(args.out, model, optimizer, step, world, args_dict)
                saved_step = step
            if stop_asked:
                raise Interrupted(f"interrupted: saved step {step} to {args.out}; continue with --resume")
    finally:
        if pointwise_before is not None:
            set_pointwise(pointwise_before)
        signal.signal(signal.SIGINT, stop.previous)
        bar.close()
        if metrics:
            metrics.close()
    if world > 1:
        dist.barrier()  # rank 0 has saved; leave the group together, then generate alone (no collectives)
        dist.destroy_process_group()
    if main:
        print(f"saved the adapter to {args.out}; try it: python generate.py --adapter {args.out} "
              f"--model {model_args.model} --quant {model_args.quant} --instruction \"...\"")
        show_samples(model, tokenizer, data.val_records(val_set)[: args.samples])


# --------------------------------------------------------------------------------------------
# Stopping with what to change (out of GPU memory); saving and resuming are checkpoint.py's
# --------------------------------------------------------------------------------------------

def lighter_flags(grad_ckpt: bool, graphs: bool, evaluating: bool) -> list[str]:
    """Flags a resumed run may change (checkpoint.SAME_ON_RESUME fixes the batches) that leave a pass more
    GPU memory. An evaluation (eager, no gradients) runs beside the graphs' memory pool: only a smaller
    pool helps it."""
    flags = ["--no-cuda-graphs (a graph keeps up to one more pass's activations)"] if graphs else []
    if not grad_ckpt and (graphs or not evaluating):
        flags.append("--grad-ckpt (recompute each block in the backward)")
    return flags


def out_of_memory(message: str, where: str, saved_step: int | None, out: str, device: str,
                  lighter: list[str]) -> torch.cuda.OutOfMemoryError:
    """The error for a pass that ran out of GPU memory: where, how much, what is kept, what to change."""
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        where += f"; {peak_memory_gib(device):.2f} of {total:.1f} GiB allocated at the peak"
    resume = f"continue with --resume and {' or '.join(lighter)}, or " if saved_step and lighter else ""
    return torch.cuda.OutOfMemoryError(
        f"out of GPU memory ({allocation(message)}) in {where}: {kept(saved_step, out)}. To fit, {resume}start "
        f"afresh with a smaller --batch-size and a larger --grad-accum (the same global batch) or a smaller --max-len")


def show_samples(model, tokenizer, records: list[dict]):
    """Answer a few held-out instructions with the trained adapter (greedy), next to the reference."""
    model.eval()
    for r in records:
        ids = tokenizer.encode(data.format_prompt(r["instruction"], r.get("input", "")), bos=True)
        if len(ids) + 64 > model.args.max_seq_len:
            continue  # no room to answer within the context
        out = list(generate_tokens(model, ids, 64, temperature=0.0, eos_id=tokenizer.eos_id))
        print(f"\n### Instruction: {r['instruction']}\n### Model: {tokenizer.decode(out)}\n### Reference: {r['output'][:300]}")


def main(argv=None):
    """train(), with the known errors (bad data, a folder that is not a model, a NaN loss, a GPU out of memory,
    a full disk...) as one line."""
    rank = int(os.environ.get("RANK", 0))
    who = f"rank {rank} failed" if "RANK" in os.environ else "error"
    try:
        train(argv)
    except (OSError, ValueError, KeyError, FloatingPointError, torch.cuda.OutOfMemoryError) as e:  # (OSError: files)
        print(f"{who}: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        sys.exit(1)
    except (Interrupted, KeyboardInterrupt) as e:  # a bare KeyboardInterrupt: the second Ctrl-C
        if rank == 0:
            print(f"\n{e or 'aborted without saving; the last checkpoint is intact'}", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # under torchrun: say which rank failed; torchrun then stops the others
        if "RANK" not in os.environ:
            raise
        traceback.print_exc()
        print(f"rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
