"""Benchmarks: QLoRA training and decoding speed and memory, side by side with the Hugging Face stack.

    python bench.py train  --shape 7b --configs 1x512,8x512,16x512,4x2048 [--vs-hf]
    python bench.py alpaca --shape 7b [--vs-hf]      # one pass over the bundled Alpaca sample
    python bench.py decode --shape 7b [--vs-hf]      # batch-1 greedy decoding, 128 new tokens
    python bench.py train  --shape 70b --configs 1x512

Our side runs the code paths train.py and generate.py run: the model is built layer by layer with
random weights (each block quantized as soon as it is made, so even the 70B shape never holds its
16-bit weights), LoRA r=16 alpha=32 on all seven linears, train.forward_loss, AdamW, gradient
checkpointing, each micro-batch replayed as a CUDA graph as train.py does (graph_step.py;
--no-cuda-graphs: eagerly). `--vs-hf` runs, in a subprocess of the same invocation, transformers + PEFT +
bitsandbytes NF4 configured as in the anchor measurements (random checkpoint saved once under
--hf-dir, from_pretrained with BitsAndBytesConfig nf4 + double quant + bf16 compute, sdpa,
non-reentrant gradient checkpointing, fused AdamW). Prints a markdown table; --out appends JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = {  # Hugging Face config fields of each named shape
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GiB = 2**30


def hf_config(shape: str) -> dict:
    return dict(SHAPES[shape], vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=False)


# ---------------------------------------------------------------------------------------------
# Our side
# ---------------------------------------------------------------------------------------------

def build_random_model(shape: str, quant: str, device: str, dtype=torch.bfloat16, seed: int = 0):
    """A Transformer of the named shape with N(0, 0.02) weights, made and quantized block by block."""
    from model import ModelArgs, Transformer
    from quant import quantize_module

    args = ModelArgs.from_hf_config(hf_config(shape))
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)

    def materialize(module):
        module.to_empty(device=device)
        for name, p in module.named_parameters():
            with torch.no_grad():
                p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02, generator=gen)

    for module in (model.embed_tokens, model.norm, model.lm_head):
        materialize(module)
    for block in model.layers:
        materialize(block)
        if quant != "none":
            quantize_module(block, quant)  # the 16-bit weights of this block are freed here
    return model


def prepare_training(model, rank: int, grad_ckpt: bool, dropout: float = 0.0):
    from lora import add_lora
    add_lora(model, r=rank, alpha=2 * rank, dropout=dropout, targets=LORA_TARGETS)
    model.gradient_checkpointing = grad_ckpt
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return params, torch.optim.AdamW(params, lr=2e-4, fused=True)


def time_steps(step, batches, warmup: int):
    """Run warm-up steps, then time the rest; returns (seconds, last loss)."""
    for b in batches[:warmup]:
        step(b)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = None
    for b in batches[warmup:]:
        loss = step(b)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, float(loss)


def make_step(model, opt, graphs: bool):
    """train.py's step: one micro-batch through graph_step.TrainStep (replayed as a CUDA graph unless
    graphs is False), AdamW, gradients zeroed in place. Returns the loss per target token."""
    from data import IGNORE_INDEX
    from graph_step import TrainStep
    from train import forward_loss
    micro = TrainStep(model, forward_loss, graphs=graphs)

    def step(batch):
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        micro(batch, 1.0 / n)
        opt.step()
        opt.zero_grad(set_to_none=False)
        return micro.take_loss_sum() / n
    return step


def ours_stack(a) -> str:
    """The stack's name in the results; as train.py, compile the pointwise functions under graphs."""
    from model import compile_pointwise
    compiled = not a.no_cuda_graphs and not a.no_compile
    compile_pointwise(compiled)
    return f"ours-{a.quant}" + ("-eager" if a.no_cuda_graphs else "-nocompile" if a.no_compile else "")


def ours_train(a) -> list[dict]:
    model = build_random_model(a.shape, a.quant, "cuda")
    params, opt = prepare_training(model, a.rank, grad_ckpt=not a.no_grad_ckpt, dropout=a.lora_dropout)
    return time_configs(ours_stack(a), make_step(model, opt, graphs=not a.no_cuda_graphs), params, a)


def time_configs(stack: str, step, params, a) -> list[dict]:
    """Time `step` on random tokens for each BATCHxSEQ of --configs; one result row each."""
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for cfg in a.configs.split(","):
        bs, seq = map(int, cfg.split("x"))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        batches = []
        for _ in range(a.warmup + a.steps):
            x = torch.randint(3, 32000, (bs, seq), device="cuda", generator=g)
            batches.append({"input_ids": x, "labels": x})  # every position supervised, as the anchors
        dt, loss = time_steps(step, batches, a.warmup)
        rows.append(dict(stack=stack, shape=a.shape, bs=bs, seq=seq, gc=int(not a.no_grad_ckpt),
                         tok_s=round(bs * seq * a.steps / dt, 1), step_ms=round(1000 * dt / a.steps, 1),
                         peak_alloc_gib=round(torch.cuda.max_memory_allocated() / GiB, 3),
                         peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GiB, 3),
                         trainable=sum(p.numel() for p in params), loss=round(loss, 3)))
        print("RESULT " + json.dumps(rows[-1]), flush=True)
    return rows


def alpaca_dataset(max_len: int):
    from data import Tokenizer, build_datasets
    tok = Tokenizer(os.path.join(HERE, "models", "llama2-tokenizer", "tokenizer.model"))
    train_set, _, _ = build_datasets(os.path.join(HERE, "data", "alpaca_sample.json"), tok, val_frac=0.0, max_len=max_len)
    return train_set


def ours_alpaca(a) -> list[dict]:
    """One pass over the bundled sample, with packing (or length grouping): the train.py batches."""
    from data import make_batches
    train_set = alpaca_dataset(a.max_len)
    batches = [{k: v.cuda() for k, v in b.items() if k != "attention_mask"}
               for b in make_batches(train_set, a.batch_size, a.max_len, pack=not a.no_pack, seed=0, epoch=0)]
    model = build_random_model(a.shape, a.quant, "cuda")
    _, opt = prepare_training(model, a.rank, grad_ckpt=not a.no_grad_ckpt, dropout=a.lora_dropout)
    return [time_pass(ours_stack(a), make_step(model, opt, graphs=not a.no_cuda_graphs), batches, train_set,
                      packed=int(not a.no_pack))]


def time_pass(stack: str, step, batches: list[dict], train_set, packed: int) -> dict:
    """Time one pass of `step` over `batches` (after two untimed warm-up batches)."""
    torch.cuda.reset_peak_memory_stats()
    for b in batches[:2]:  # warm-up (kernel autotuning) outside the timed pass
        step(b)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches:
        step(b)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens = sum(len(x) for x in train_set.input_ids)
    row = dict(stack=stack, what="alpaca-pass", examples=len(train_set), tokens=tokens, batches=len(batches),
               packed=packed, wall_s=round(dt, 2), tok_s=round(tokens / dt, 1),
               peak_alloc_gib=round(torch.cuda.max_memory_allocated() / GiB, 3))
    print("RESULT " + json.dumps(row), flush=True)
    return row


def time_decode(run, repeats: int) -> tuple[int, list[float]]:
    """run() decodes and returns how many tokens it made. One untimed run first, of the same
    length (kernel compilation, autotuning, and the attention backend's per-shape setup: the
    KV cache's length is part of the shape), then `repeats` timed ones: (tokens, tok/s each)."""
    run()
    rates = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = run()
        torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t0))
    return n, rates


@torch.no_grad()
def replay_ms(step, replays: int = 50) -> float:
    """Milliseconds per token of a captured decoding step (a generate.CapturedForward) replayed
    back to back: the GPU's share of a token, without the per-prompt prefill or the setup."""
    step.graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(replays):
        step.graph.replay()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / replays


def ours_decode(a) -> list[dict]:
    """Two rows: generate_tokens, which sets a Decoder up for each call (cache, warm-up steps,
    the graph's capture) as a one-shot `generate.py --prompt` does, and one Decoder kept across
    the calls, as `generate.py --chat` does for every answer after its first."""
    from generate import Decoder, generate_tokens
    model = build_random_model(a.shape, a.quant, "cuda").eval()
    if not a.no_compile:
        from model import compile_pointwise
        compile_pointwise()  # as generate.py does on cuda
    prompt = torch.randint(3, 32000, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    eager = "-eager" if a.no_compile else ""
    rows = []
    decoder = Decoder(model)
    for stack, run in [(f"ours-generate-{a.quant}{eager}", lambda: len(list(generate_tokens(model, prompt, a.new)))),
                       (f"ours-decoder-{a.quant}{eager}", lambda: len(list(decoder.generate(prompt, a.new))))]:
        n, rates = time_decode(run, a.repeats)
        row = dict(stack=stack, shape=a.shape, new_tokens=n, tok_s=round(statistics.median(rates), 1),
                   tok_s_runs=[round(r, 1) for r in rates],
                   peak_alloc_gib=round(torch.cuda.max_memory_allocated() / GiB, 3))
        if decoder.step is not None:
            row["replay_ms_per_token"] = round(replay_ms(decoder.step), 2)
        print("RESULT " + json.dumps(row), flush=True)
        rows.append(row)
    decoder.close()
    return rows


# ---------------------------------------------------------------------------------------------
# The Hugging Face stack (optional imports; run in a subprocess so each side has the GPU alone)
# ---------------------------------------------------------------------------------------------

def import_transformers():
    """Import transformers without letting it see this project's top-level `kernels/` package:
    transformers looks for an optional package of that name (Hugging Face's hub kernels)."""
    import data  # noqa: F401  (our modules the HF side uses are imported first)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
    import transformers
    return transformers


def hf_prepare(shape: str, folder: str):
    if os.path.isfile(os.path.join(folder, "config.json")):
        return
    import_transformers()
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = {k: v for k, v in hf_config(shape).items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = LlamaForCausalLM(LlamaConfig(**cfg, dtype="bfloat16")).to(torch.bfloat16)
    m.save_pretrained(folder, max_shard_size="5GB")
    del m
    torch.cuda.empty_cache()


def hf_load(folder: str, quant: str):
    import_transformers()
    from transformers import BitsAndBytesConfig, LlamaForCausalLM
    kw = dict(dtype=torch.bfloat16, device_map={"": 0}, attn_implementation="sdpa")
    if quant == "nf4":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    return LlamaForCausalLM.from_pretrained(folder, **kw)


def hf_training_model(a):
    from peft import LoraConfig, get_peft_model
    m = hf_load(a.hf_dir, a.quant)
    m.train()
    if not a.no_grad_ckpt:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()
    m = get_peft_model(m, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=a.lora_dropout,
                                     target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"))
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=True)

    def step(batch):
        loss = m(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return m, params, step


def hf_train(a) -> list[dict]:
    _, params, step = hf_training_model(a)
    return time_configs(f"hf+peft+bnb-{a.quant}", step, params, a)


def hf_alpaca(a) -> list[dict]:
    """The HF way: batches of --batch-size examples in random order, each padded to its longest."""
    from data import DataCollatorForSupervisedDataset, random_batches
    train_set = alpaca_dataset(a.max_len)
    collate = DataCollatorForSupervisedDataset(pad_id=0)
    batches = []
    for idx in random_batches(len(train_set), a.batch_size, seed=0, epoch=0):
        b = collate([train_set[i] for i in idx])
        batches.append({"input_ids": b["input_ids"].cuda(), "labels": b["labels"].cuda(),
                        "attention_mask": b["attention_mask"].long().cuda()})
    _, _, step = hf_training_model(a)
    return [time_pass(f"hf+peft+bnb-{a.quant}", step, batches, train_set, packed=0)]


def hf_decode(a) -> list[dict]:
    m = hf_load(a.hf_dir, a.quant).eval()
    x = torch.randint(3, 32000, (1, 16), generator=torch.Generator().manual_seed(0)).cuda()
    gen = dict(do_sample=False, min_new_tokens=a.new, max_new_tokens=a.new, pad_token_id=0)
    n, rates = time_decode(lambda: m.generate(x, **gen).shape[1] - x.shape[1], a.repeats)
    row = dict(stack=f"hf-generate+bnb-{a.quant}", shape=a.shape, new_tokens=n,
               tok_s=round(statistics.median(rates), 1), tok_s_runs=[round(r, 1) for r in rates],
               peak_alloc_gib=round(torch.cuda.max_memory_allocated() / GiB, 3))
    print("RESULT " + json.dumps(row), flush=True)
    return [row]


# ---------------------------------------------------------------------------------------------

def run_hf_subprocess(a) -> list[dict]:
    """Run the HF side of `a.cmd` in a fresh process; collect its RESULT lines."""
    hf_prepare_cmd = [sys.executable, __file__, "_hf_prepare", "--shape", a.shape, "--hf-dir", a.hf_dir]
    subprocess.run(hf_prepare_cmd, check=True)
    argv = [sys.executable, __file__, "_hf_" + a.cmd] + [x for x in sys.argv[2:] if x != "--vs-hf"]
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
    return [json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]


def print_table(ours: list[dict], hf: list[dict]):
    print()
    if ours and "bs" in ours[0]:
        print("| shape | batch x seq | ours tok/s | ours peak GiB | HF tok/s | HF peak GiB | speed-up |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for o in ours:
            h = next((r for r in hf if r["bs"] == o["bs"] and r["seq"] == o["seq"]), None)
            hf_cols = f"{h['tok_s']:,.0f} | {h['peak_alloc_gib']:.2f} | {o['tok_s'] / h['tok_s']:.2f}x" if h else "- | - | -"
            print(f"| {o['shape']} | {o['bs']} x {o['seq']} | {o['tok_s']:,.0f} | {o['peak_alloc_gib']:.2f} | {hf_cols} |")
    elif ours and ours[0].get("what") == "alpaca-pass":
        o, h = ours[0], (hf[0] if hf else None)
        print("| one pass over the Alpaca sample | wall s | tok/s | peak GiB |")
        print("| --- | ---: | ---: | ---: |")
        print(f"| ours ({'packed' if o['packed'] else 'length-grouped'}) | {o['wall_s']} | {o['tok_s']:,.0f} | {o['peak_alloc_gib']:.2f} |")
        if h:
            print(f"| HF (padded to each batch's longest) | {h['wall_s']} | {h['tok_s']:,.0f} | {h['peak_alloc_gib']:.2f} |")
            print(f"\nwall-time speed-up: {h['wall_s'] / o['wall_s']:.2f}x")
    elif ours:
        print("| decode batch 1 | tok/s (median) | runs | graph replay, ms per token | peak GiB |")
        print("| --- | ---: | --- | ---: | ---: |")
        for r in ours + hf:
            runs = ", ".join(f"{t:.1f}" for t in r["tok_s_runs"])
            replay = f"{r['replay_ms_per_token']:.2f}" if "replay_ms_per_token" in r else "-"
            print(f"| {r['stack']} | {r['tok_s']:,.1f} | {runs} | {replay} | {r['peak_alloc_gib']:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("cmd", choices=["train", "alpaca", "decode", "_hf_prepare", "_hf_train", "_hf_alpaca", "_hf_decode"],
                   help="what to measure (underscored commands are the HF side, run in a subprocess)")
    p.add_argument("--shape", default="7b", choices=list(SHAPES), help="model shape (random weights)")
    p.add_argument("--quant", default="nf4", choices=["nf4", "int4", "none"], help="base weight format")
    p.add_argument("--configs", default="1x512,8x512,16x512,4x2048", help="train: comma-separated BATCHxSEQ")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="train, alpaca: dropout on the adapters' input (train.py's default is 0.05), both stacks")
    p.add_argument("--no-grad-ckpt", action="store_true", help="train without gradient checkpointing")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="train, alpaca: run each micro-batch eagerly, not replayed as a CUDA graph (graph_step.py)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--batch-size", type=int, default=8, help="alpaca: rows (packed) or examples per batch")
    p.add_argument("--max-len", type=int, default=512, help="alpaca: max tokens per example / packed row")
    p.add_argument("--no-pack", action="store_true", help="alpaca: length-grouped padded batches instead of packing")
    p.add_argument("--new", type=int, default=128, help="decode: new tokens")
    p.add_argument("--repeats", type=int, default=3, help="decode: timed runs (the table gives the median)")
    p.add_argument("--no-compile", action="store_true",
                   help="keep the pointwise functions (RMSNorm, rotary, SwiGLU) eager: decode as generate.py "
                        "--no-compile, train and alpaca as train.py --no-compile; by default they are compiled, "
                        "as generate.py does on cuda and train.py under CUDA graphs")
    p.add_argument("--vs-hf", action="store_true", help="also run transformers + PEFT + bitsandbytes, same machine")
    p.add_argument("--hf-dir", default=None, help="where the HF side's random checkpoint is saved (default: /tmp/bench_hf_ckpt_SHAPE)")
    p.add_argument("--out", default=None, help="append the result rows as JSON lines to this file")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench.py measures GPU speed: it needs CUDA")
    a.hf_dir = a.hf_dir or f"/tmp/bench_hf_ckpt_{a.shape}"
    if a.repeats < 1:
        sys.exit("--repeats must be at least 1")
    if a.vs_hf and a.quant != "nf4":
        sys.exit("--vs-hf compares with bitsandbytes NF4: use --quant nf4")
    if a.cmd.startswith("_hf"):
        if a.cmd == "_hf_prepare":
            return hf_prepare(a.shape, a.hf_dir)
        return {"_hf_train": hf_train, "_hf_alpaca": hf_alpaca, "_hf_decode": hf_decode}[a.cmd](a)
    ours = {"train": ours_train, "alpaca": ours_alpaca, "decode": ours_decode}[a.cmd](a)
    torch.cuda.empty_cache()
    hf = run_hf_subprocess(a) if a.vs_hf else []
    print_table(ours, hf)
    if a.out:
        with open(a.out, "a") as f:
            for r in ours + hf:
                f.write(json.dumps(dict(r, device=torch.cuda.get_device_name(), torch=torch.__version__)) + "\n")


if __name__ == "__main__":
    main()
