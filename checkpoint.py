"""What a training run keeps, so that `train.py --resume` continues it exactly, and how it stops
without losing it.

OUT/checkpoint.pt holds all that --resume needs: the step, the adapters, AdamW's moments, the flags
the run was started with, and its number of processes. Nothing else is saved, because nothing else
is state: the data order is a function of (seed, epoch), the learning rate a function of the step,
and the dropout masks come from a generator reseeded every step (train.seed_step). So a resumed run
repeats the uninterrupted one bit for bit, which tests/test_train.py checks.

A checkpoint is written to a temporary file, flushed to disk, then renamed over the old one: a crash
or a full disk mid-save leaves the previous checkpoint whole. A run stops on Ctrl-C after its current
step (saving it first); on a NaN, a failed save or running out of GPU memory, it stops with one line
that says which step the checkpoint holds (train.py).

OUT/metrics.jsonl is the log a user plots: one JSON line per logged step. A resumed run drops the
lines logged after its checkpoint, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import torch
from tqdm import tqdm

from lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, atomic_write, lora_state_dict, save_adapter

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
# --resume refuses other values of these: they change the data, its order, or what the saved state means.
SAME_ON_RESUME = ("model", "quant", "lora_r", "lora_alpha", "lora_targets", "data", "val_data", "val_frac",
                  "max_len", "pack", "batch_size", "grad_accum", "seed")
PATHS = ("model", "data", "val_data")  # compared as the files they name: ./data/x.json is data/x.json


def check_out(out: str, resume: bool, overwrite: bool):
    """Refuse, before anything is loaded, an --out that cannot take this run: a file, --resume with no
    checkpoint there, or a new run over a checkpoint without --overwrite (it would lose that run)."""
    path = os.path.join(out, CHECKPOINT)
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    if resume and not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {out} (drop --resume to start a new run)")
    if not resume and not overwrite and os.path.isfile(path):
        raise FileExistsError(f"{path} exists: continue that run with --resume, or start afresh with --overwrite")


def save_checkpoint(out: str, model, optimizer, step: int, world: int, args_dict: dict):
    """checkpoint.pt (what --resume reads), then the adapter in PEFT's layout (for generate.py and PEFT).

    Each file goes to a temporary file, flushed to disk, then renamed over the old one (atomic on POSIX):
    a crash mid-save leaves the previous checkpoint whole."""
    state = {"step": step, "world_size": world, "adapter": lora_state_dict(model), "optimizer": optimizer.state_dict(), "args": args_dict}

    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(state, f)
    atomic_write(os.path.join(out, CHECKPOINT), write)
    save_adapter(model, out, base_model_path=args_dict["model"])


def save_or_explain(out: str, model, optimizer, step: int, world: int, args_dict: dict, after: str = ""):
    """save_checkpoint, or one line that says why not and which step --resume would continue from.

    A full disk makes torch.save and safetensors raise an OSError or a RuntimeError, depending on where
    the write fails: any error of the save becomes an OSError (train.main prints it as one line)."""
    try:
        save_checkpoint(out, model, optimizer, step, world, args_dict)
    except Exception as e:
        there = checkpoint_step(out)
        holds = f"{CHECKPOINT} there holds step {there}" if there else f"no {CHECKPOINT} there"
        why = (str(e).splitlines() or [type(e).__name__])[0]
        free = shutil.disk_usage(out).free / 2**20
        raise OSError(f"could not save step {step} to {out}{after} ({why}; {free:,.0f} MiB free there): {holds}") from e


def restore_checkpoint(out: str, model, optimizer, world: int, args_dict: dict, device) -> int:
    """Load OUT/checkpoint.pt into the adapters and the optimizer, after checking it fits this run; its step."""
    path = os.path.join(out, CHECKPOINT)  # (check_out made sure it is there)
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if ckpt["world_size"] != world:
        raise ValueError(f"--resume: {path} was trained by {ckpt['world_size']} process(es), this run has {world}: "
                         f"use the same number (the global batches and their order depend on it)")
    changed = [f"--{k.replace('_', '-')} {args_dict[k]!r} (checkpoint: {ckpt['args'].get(k)!r})"
               for k in SAME_ON_RESUME if not same_setting(k, ckpt["args"].get(k), args_dict[k])]
    if changed:
        raise ValueError(f"--resume: {path} was trained with other settings: {'; '.join(changed)}")
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in ckpt["adapter"].items():
            named[name].copy_(t)
    optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt["step"]


def same_setting(key: str, saved, now) -> bool:
    """Whether a flag's value in the checkpoint and in this run are the same (paths: the same file)."""
    if key in PATHS and saved and now:
        return os.path.realpath(saved) == os.path.realpath(now)
    return saved == now


def checkpoint_step(out: str) -> int | None:
    """The step of OUT/checkpoint.pt, or None if there is none (memory-mapped: its tensors are not read)."""
    path = os.path.join(out, CHECKPOINT)
    return torch.load(path, mmap=True, weights_only=True, map_location="cpu")["step"] if os.path.isfile(path) else None


def kept(saved_step: int | None, out: str) -> str:
    """What a run that stops on an error leaves for --resume (steps count from 1)."""
    return f"the checkpoint of step {saved_step} in {out} is intact" if saved_step else "no checkpoint was saved"


def start_run(out: str, resumed_step: int | None):
    """OUT/metrics.jsonl, opened for this run's lines (on rank 0, once the data and the model are loaded).

    A new run (--overwrite) first removes the previous run's checkpoint and adapter: if it stopped before
    its first save, a --resume would otherwise continue the old run under the new one's log. A resumed run
    drops the lines logged after its checkpoint (the interrupted run got further than it saved), so the
    file reads as one uninterrupted run."""
    path = os.path.join(out, METRICS)
    if resumed_step is None:
        for name in (CHECKPOINT, ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            if os.path.isfile(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    lines = []
    if resumed_step is not None and os.path.isfile(path):
        with open(path) as f:
            lines = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= resumed_step]
    f = open(path, "w")
    f.writelines(lines)
    return f


class Interrupted(Exception):
    """Training stopped on Ctrl-C, after saving a checkpoint."""


class StopRequest:
    """Ctrl-C (SIGINT) asks to stop after the current step, save and exit: a step is never cut in half (an
    interrupt inside optimizer.step() would leave the adapters half updated). A second Ctrl-C aborts without
    saving; not under torchrun, which repeats the Ctrl-C to its workers itself (and kills them 30 s later)."""

    def __init__(self, verbose: bool, second_aborts: bool):
        self.asked, self.verbose, self.second_aborts = False, verbose, second_aborts
        self.previous = signal.signal(signal.SIGINT, self)

    def __call__(self, signum, frame):
        if self.asked and self.second_aborts:
            raise KeyboardInterrupt
        if self.verbose and not self.asked:
            tqdm.write("Ctrl-C: stopping after this step to save a checkpoint" + (" (again: abort without saving)" if self.second_aborts else ""))
        self.asked = True
