"""Fine-tune a (4-bit) LLaMA with LoRA on instruction data: QLoRA in one readable loop.

    python train.py                                   # bundled tiny model + Alpaca sample, CPU-friendly
    python train.py --data alpaca.json --model path/to/Llama-2-7b-hf --quant nf4 --out runs/alpaca
    torchrun --nproc_per_node 2 train.py ...          # data parallel over 2 GPUs (or 2 CPU processes)

The order follows Stanford Alpaca's train.py: constants, argument dataclasses, data, model, the
loop, saving. What QLoRA adds (Dettmers et al. 2023): the frozen base weights are 4-bit NF4
(quant.py), only LoRA adapters train (lora.py), in bf16 compute with fp32 adapter weights.

The loss of one optimizer step is the sum of token losses over the whole accumulation window (all
micro-batches, all ranks) divided by the number of target tokens in that window: every response
token weighs the same, whatever batch it fell in (not a mean of per-batch means).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from generate import build_model, generate_tokens
from lora import add_lora, lora_state_dict, save_adapter
from loss import causal_lm_loss_sum
from model import load_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(HERE, "models", "stories260K")
DEFAULT_DATA = os.path.join(HERE, "data", "alpaca_sample.json")
CHECKPOINT = "checkpoint.pt"  # optimizer, scheduler, RNG and data position, next to the adapter


@dataclass
class ModelArguments:
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "model folder (HF or Meta layout, with tokenizer.model); default: the bundled tiny model"})
    quant: str = field(default="nf4", metadata={"help": "base weights: nf4 (QLoRA), int4, or none (16-bit)", "choices": ["nf4", "int4", "none"]})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank r"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha: the update is scaled by alpha / r"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_targets: str = field(default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", metadata={"help": "comma-separated linear names that get adapters"})
    grad_ckpt: bool = field(default=False, metadata={"help": "gradient checkpointing: recompute each block in backward (less memory, ~30%% slower)"})


@dataclass
class DataArguments:
    data: str = field(default=DEFAULT_DATA, metadata={"help": "Alpaca JSON (list of {instruction, input, output}) or JSON Lines; default: the bundled sample"})
    val_data: Optional[str] = field(default=None, metadata={"help": "held-out file; default: split --val-frac off --data"})
    val_frac: float = field(default=0.02, metadata={"help": "fraction of --data held out when --val-data is not given"})
    max_len: int = field(default=512, metadata={"help": "longest example in tokens; longer ones are truncated keeping the response"})
    pack: bool = field(default=False, metadata={"help": "pack several examples into each row of --max-len tokens (no padding computed)"})


@dataclass
class TrainingArguments:
    out: str = field(default="runs/alpaca", metadata={"help": "output folder: adapter, checkpoint.pt, metrics.jsonl"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate (AdamW)"})
    epochs: int = field(default=1, metadata={"help": "passes over the training data"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0: run all epochs)"})
    batch_size: int = field(default=8, metadata={"help": "examples (or packed rows) per micro-batch, per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warm-up steps before the cosine decay"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on the adapters"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: no clipping)"})
    log_every: int = field(default=1, metadata={"help": "write metrics every N steps"})
    eval_every: int = field(default=50, metadata={"help": "held-out loss every N steps (0: only at the end)"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (and at the end)"})
    samples: int = field(default=3, metadata={"help": "held-out instructions to answer at the end"})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "cpu or cuda"})
    seed: int = field(default=42, metadata={"help": "seed for data order, initialization and dropout"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/checkpoint.pt"})


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
                group.add_argument(flag, type=({"int": int, "float": float}.get(f.type, str)), choices=f.metadata.get("choices"), **kw)
    ns = vars(p.parse_args(argv))
    return [cls(**{f.name: ns[f.name] for f in dataclasses.fields(cls)}) for cls in (ModelArguments, DataArguments, TrainingArguments)]


# --------------------------------------------------------------------------------------------
# Distributed data parallel (torchrun): each rank holds its own 4-bit base model and adapters;
# DDP all-reduces the adapter gradients. Plain `python train.py` is world size 1.
# --------------------------------------------------------------------------------------------

def setup_distributed(device: str) -> tuple[int, int, str]:
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def global_sum(x: float, world: int, device) -> float:
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def lr_at(step: int, args: TrainingArguments, total_steps: int) -> float:
    """Linear warm-up to args.lr, then cosine decay to 0 at total_steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Sum of target-token losses of one micro-batch, and its number of target tokens."""
    raw = model.module if hasattr(model, "module") else model
    hidden = model(batch["input_ids"], input_pos=batch.get("input_pos"), doc_ids=batch.get("doc_ids"), return_hidden=True)
    return causal_lm_loss_sum(hidden, raw.lm_head.weight, batch["labels"])


@torch.no_grad()
def evaluate(model, batches: list[dict], device) -> float:
    model.eval()
    total, n = 0.0, 0
    for batch in batches:
        loss, k = forward_loss(model, to_device(batch, device))
        total, n = total + loss.item(), n + k
    model.train()
    return total / max(n, 1)


def save_checkpoint(out: str, model, optimizer, step: int, rng: dict, args_dict: dict):
    """Adapter in PEFT layout plus the training state, each written to a temporary file then renamed."""
    save_adapter(model, out, base_model_path=args_dict["model"])
    state = {"step": step, "adapter": lora_state_dict(model), "optimizer": optimizer.state_dict(), "rng": rng, "args": args_dict}
    tmp = os.path.join(out, CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(out, CHECKPOINT))  # atomic: a crash leaves the old checkpoint whole


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def train(argv=None):
    model_args, data_args, args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    main = rank == 0
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32  # bf16 on GPU, fp32 on CPU

    # ---- data: records -> tokenized examples with masked prompts -> batches -------------------
    tokenizer = load_tokenizer(model_args.model)
    train_set, val_set, report = data.build_datasets(data_args.data, tokenizer, val_path=data_args.val_data,
                                                     val_frac=data_args.val_frac, max_len=data_args.max_len, seed=args.seed)
    if main:
        print(report)

    def epoch_batches(epoch: int) -> data.Batches:
        """The epoch's global batches of world x batch_size rows (a pure function of seed and epoch)."""
        return data.make_batches(train_set, args.batch_size * world, data_args.max_len, pack=data_args.pack,
                                 seed=args.seed, epoch=epoch, drop_last=world > 1)

    steps_per_epoch = len(epoch_batches(0)) // args.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training examples make no full step of batch {args.batch_size} x "
                         f"{args.grad_accum} accumulation x {world} processes")
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    val_batches = data.make_batches(val_set, args.batch_size, data_args.max_len) if len(val_set) else []

    # ---- model: load (quantizing each block as it arrives), add LoRA, freeze the rest ---------
    model = build_model(model_args.model, device, dtype, model_args.quant)
    add_lora(model, r=model_args.lora_r, alpha=model_args.lora_alpha, dropout=model_args.lora_dropout,
             targets=tuple(model_args.lora_targets.split(",")))
    model.to(device)
    model.gradient_checkpointing = model_args.grad_ckpt
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    if main:
        print(f"trainable LoRA parameters: {n_train:,} of {sum(p.numel() for p in model.parameters()):,}")
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    ddp_model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None,
        broadcast_buffers=False) if world > 1 else model  # the 4-bit weights are buffers: never broadcast them

    step = 0
    if args.resume:
        ckpt = torch.load(os.path.join(args.out, CHECKPOINT), map_location=device, weights_only=False)
        model.load_state_dict(ckpt["adapter"], strict=False)
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        set_rng_state(ckpt["rng"])
        if main:
            print(f"resumed from {args.out}/{CHECKPOINT} at step {step}")

    # ---- the loop ----------------------------------------------------------------------------
    args_dict = {**dataclasses.asdict(model_args), **dataclasses.asdict(data_args), **dataclasses.asdict(args)}
    metrics = open(os.path.join(args.out, "metrics.jsonl"), "a") if main else None
    bar = tqdm(total=total_steps, initial=step, disable=not main, dynamic_ncols=True)
    epoch, batches = -1, []
    good_rng = rng_state()  # the RNG state at the last step boundary (saved with checkpoints)
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            if step // steps_per_epoch != epoch:
                epoch = step // steps_per_epoch
                batches = epoch_batches(epoch)
            first = (step % steps_per_epoch) * args.grad_accum
            # This rank's share of each global batch in the accumulation window.
            window = [to_device(data.shard_batch(b, rank, world), device) for b in batches[first:first + args.grad_accum]]
            n_window = global_sum(sum(int((b["labels"][:, 1:] != data.IGNORE_INDEX).sum()) for b in window), world, device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args, total_steps)
            loss_sum = 0.0
            for i, batch in enumerate(window):
                sync = i == len(window) - 1  # all-reduce gradients once, after the last micro-batch
                with (ddp_model.no_sync() if world > 1 and not sync else contextlib.nullcontext()):
                    loss, _ = forward_loss(ddp_model, batch)
                    # DDP averages gradients over ranks; scaling by world turns that into a sum.
                    (loss * (world / max(n_window, 1))).backward()
                loss_sum += loss.item()
            loss_val = global_sum(loss_sum, world, device) / max(n_window, 1)
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"loss is {loss_val} at step {step}: stopping; the last checkpoint in "
                                         f"{args.out} is intact (try a lower --lr)")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm) if args.max_grad_norm > 0 else torch.zeros(())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            good_rng = rng_state()

            dt = time.perf_counter() - t0
            tokens = global_sum(sum(int(b["attention_mask"].sum()) for b in window), world, device)  # non-pad
            if main:
                mem = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                tok_s=f"{tokens / dt:,.0f}", mem=f"{mem:.1f}G")
                bar.update(1)
                if step % args.log_every == 0:
                    metrics.write(json.dumps({"step": step, "epoch": epoch, "loss": loss_val, "lr": optimizer.param_groups[0]["lr"],
                                              "grad_norm": float(grad_norm), "tokens_per_s": tokens / dt,
                                              "target_tokens": n_window, "max_mem_gib": mem}) + "\n")
                    metrics.flush()
            if main and val_batches and ((args.eval_every and step % args.eval_every == 0) or step == total_steps):
                val = evaluate(model, val_batches, device)
                metrics.write(json.dumps({"step": step, "val_loss": val}) + "\n")
                metrics.flush()
                tqdm.write(f"step {step}: val_loss {val:.4f}")
            if main and (step % args.save_every == 0 or step == total_steps):
                save_checkpoint(args.out, model, optimizer, step, good_rng, args_dict)
            if world > 1:
                dist.barrier()  # others wait while rank 0 evaluates or saves
    except KeyboardInterrupt:
        if main:
            save_checkpoint(args.out, model, optimizer, step, good_rng, args_dict)
            print(f"\ninterrupted: saved step {step} to {args.out}; continue with --resume")
        raise SystemExit(130)
    finally:
        bar.close()
        if metrics:
            metrics.close()

    if main:
        print(f"saved the adapter to {args.out}")
        show_samples(model, tokenizer, data.val_records(val_set)[: args.samples], device)
    if world > 1:
        dist.destroy_process_group()


def show_samples(model, tokenizer, records: list[dict], device):
    """Answer a few held-out instructions with the trained adapter (greedy)."""
    model.eval()
    for r in records:
        prompt = data.format_prompt(r["instruction"], r.get("input", ""))
        ids = tokenizer.encode(prompt, bos=True)
        out = list(generate_tokens(model, ids, 64, temperature=0.0, eos_id=tokenizer.eos_id))
        print(f"\n### Instruction: {r['instruction']}\n### Model: {tokenizer.decode(out)}\n### Reference: {r['output']}")


if __name__ == "__main__":
    train()
