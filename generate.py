"""Chat with a LLaMA (optionally 4-bit, optionally with a LoRA adapter): prompt -> tokens -> text.

    python generate.py --prompt "Once upon a time" --temperature 0
    python generate.py --model path/to/Llama-2-7b-hf --quant nf4 --adapter out/ \\
        --instruction "Give three tips for staying healthy."
    python generate.py --model path/to/Llama-2-7b-hf --quant nf4 --adapter out/ --chat

Decoding, as in gpt-fast: one forward pass over the prompt fills the KV cache (prefill), then one
token at a time reads the cache instead of recomputing the past. Sampling: temperature scales the
logits (0 means greedy argmax), top-k keeps the k most likely tokens, top-p keeps the smallest set
whose probabilities sum to p. The text is streamed as it is produced.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Iterator, Optional

import torch

from data import format_prompt
from model import Transformer, compile_pointwise, load_model, load_tokenizer

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "stories260K")


def sample(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, vocab) -> next token ids (B,)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token if the tokens ranked above it already cover top_p (the first is always kept).
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class CapturedForward:
    """model(T tokens at positions p .. p + T - 1) -> the logits of one of them (1, vocab), replayed
    as a CUDA graph.

    Decoding one token of a 7B model launches ~1,000 small kernels; on a GPU their launch overhead,
    not the 3.5 GB of 4-bit weights, would dominate. A CUDA graph records the launches once (into
    static input/output buffers) and replays them with one call. Shapes never change between
    calls: T is fixed, the KV cache has a fixed length and the attention mask comes from
    `input_pos`. (Even replayed, each kernel costs a microsecond or two: `--compile` fuses the
    pointwise ones.) A Decoder keeps one for the decoding step (T = 1) and one per padded prompt
    length for the prefill. Only the wanted token goes through the LM head: a graph's output
    stays allocated as long as the graph, and (T, vocab) logits of long prompts would add up.
    Without a graph (use_graph False, or on the CPU) the same buffers run the model eagerly.
    """

    def __init__(self, model: Transformer, n_tokens: int, use_graph: bool, first_pos: int, pool=None):
        self.model = model
        device = model.embed_tokens.weight.device
        self.tokens = torch.zeros(1, n_tokens, dtype=torch.long, device=device)
        # Warm-up and capture really run the model, writing the cache at these positions; the
        # first real call writes the same slots again, so nothing they leave behind is ever read.
        self.pos = torch.arange(first_pos, first_pos + n_tokens, device=device)
        self.last = torch.full((1,), n_tokens - 1, dtype=torch.long, device=device)  # the token wanted
        self.graph = None
        if use_graph and device.type == "cuda":
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up (compiles and autotunes kernels) off the graph
                for _ in range(2):
                    self._forward()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            # (graphs that share a pool are replayed one at a time, and each output is read
            # before the next replay: they may reuse each other's intermediate buffers)
            with torch.cuda.graph(self.graph, pool=pool):
                self.logits = self._forward()

    def _forward(self) -> torch.Tensor:
        hidden = self.model(self.tokens, input_pos=self.pos, return_hidden=True)
        return self.model.lm_head(hidden.index_select(1, self.last))[:, 0]

    def __call__(self, tokens: torch.Tensor, first_pos: int, last: Optional[int] = None) -> torch.Tensor:
        """The logits of token `last` (default: the final one) of `tokens` at first_pos onwards."""
        n = self.tokens.shape[1]
        self.tokens.copy_(tokens.view(1, n))
        torch.arange(first_pos, first_pos + n, out=self.pos)
        self.last.fill_(n - 1 if last is None else last)
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits


def context_needed(model: Transformer, prompt_ids: list[int], max_new_tokens: int) -> int:
    """Cache slots a prompt and its new tokens need (at most the model's context)."""
    if not prompt_ids:
        raise ValueError("empty prompt: give at least one token (the tokenizer's BOS)")
    total = min(len(prompt_ids) + max_new_tokens, model.args.max_seq_len)
    if len(prompt_ids) >= total:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in the context of "
                         f"{model.args.max_seq_len}")
    return total


class Decoder:
    """A model set up for decoding, kept from one prompt to the next: its KV cache and its graphs.

    Per prompt, `generate` runs the prefill (one pass over the prompt fills cache slots 0..T-1,
    and gives the first new token), then one step per token. On a GPU both are CUDA graphs
    (CapturedForward), and setting them up costs more than running them: the cache's allocation,
    two warm-up passes and the capture, eager passes that the host's CPU bounds (0.4-0.5 s of a
    128-token call for a 7B model on an H100, BENCHMARKS.md). A Decoder pays it once: the step at
    its first prompt, the prefill at the second prompt of a length (rounded up to PREFILL_STEP).
    Its prompts reuse the same cache slots: past a prompt's end they still hold an earlier
    prompt's keys and values, which the mask hides (the query at position p sees slots 0..p, all
    written by this prompt's prefill and steps).

    max_seq_len: the cache's length. A prompt that needs more grows it, to a multiple of 256 and
    at most the model's context, and the graphs are captured again for the new buffers (the
    attention of every step reads all the slots, so the cache is kept no longer than the prompts
    need). None: sized by the first prompt.
    """

    GROW = 256
    PREFILL_STEP = 64  # (a 16-token prompt of a 7B model on the H100: 13.3 ms padded to 64, 20.9 to 32)

    def __init__(self, model: Transformer, max_seq_len: Optional[int] = None, cuda_graph: bool = True):
        self.model = model
        self.graphs = cuda_graph and model.embed_tokens.weight.device.type == "cuda"
        self.turns = 0  # prompts begun: only the latest one's generator may go on (one cache)
        self.caches = None
        self.close()  # (sets the empty state)
        if max_seq_len:
            self._allocate(max_seq_len)

    def _allocate(self, length: int):
        self.close()
        self.model.setup_cache(batch_size=1, max_seq_len=length)
        self.caches = [layer.self_attn.kv_cache for layer in self.model.layers]
        self.cache_len = length
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None

    def close(self):
        """Free the cache (and the captured graphs that write into it)."""
        if self.caches is not None and self.model.layers[0].self_attn.kv_cache is self.caches[0]:
            self.model.remove_cache()  # (only if it is ours: another Decoder may have put its own)
        self.caches, self.cache_len = None, 0
        self.step, self.prefills, self.seen, self.pool = None, {}, set(), None

    def _install(self):
        """Put this Decoder's cache back on the model if something took it off since (another
        Decoder, a generate_tokens call, model.remove_cache): the model reads its cache from its
        layers, and the captured graphs write into these very buffers. Checked before every pass:
        generators of two Decoders may take turns."""
        if self.model.layers[0].self_attn.kv_cache is not self.caches[0]:
            for layer, cache in zip(self.model.layers, self.caches):
                layer.self_attn.kv_cache = cache

    def _prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        """One pass over the prompt: fills cache slots 0..T-1; the logits of its last token.

        With graphs, a prompt whose length, rounded up to a multiple of PREFILL_STEP, has come
        before is padded to that size and the pass of that size is captured, once (an eager pass
        of a 7B model costs the host about 0.1 s; the capture, three passes: a prompt seen once
        does not pay it). The padding writes slots past the prompt: hidden like any slot past the
        position being computed, and written again by the tokens that follow.
        """
        model, n = self.model, len(prompt_ids)
        device = model.embed_tokens.weight.device
        size = min(-(-n // self.PREFILL_STEP) * self.PREFILL_STEP, self.cache_len)
        if not self.graphs or size not in self.seen:
            self.seen.add(size)
            return CapturedForward(model, n, False, first_pos=0)(torch.tensor(prompt_ids, device=device), 0)
        if size not in self.prefills:
            self.prefills[size] = CapturedForward(model, size, True, first_pos=0, pool=self.pool)
        return self.prefills[size](torch.tensor(prompt_ids + [0] * (size - n), device=device), 0, last=n - 1)

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, eos_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> Iterator[int]:
        """Yield new token ids one by one (batch 1); stop at `eos_id` or after max_new_tokens."""
        model = self.model
        self.turns += 1
        turn = self.turns
        total = context_needed(model, prompt_ids, max_new_tokens)
        if total > self.cache_len:
            self._allocate(min(-(-total // self.GROW) * self.GROW, model.args.max_seq_len))
        self._install()
        logits = self._prefill(prompt_ids)  # the whole prompt in one pass, and the first new token
        for pos in range(len(prompt_ids), total):
            next_id = sample(logits, temperature, top_k, top_p, generator)
            token = int(next_id)
            if token == eos_id:
                return
            yield token
            if pos + 1 < total:
                if turn != self.turns or self.caches is None:
                    raise RuntimeError("this Decoder began another prompt (or was closed) since: its "
                                       "cache no longer holds this one's; finish a prompt's tokens first")
                self._install()  # (another Decoder's generator may have run while this one waited)
                if self.step is None:  # warm-up and capture write slot pos, which the step rewrites
                    self.step = CapturedForward(model, 1, self.graphs, first_pos=pos, pool=self.pool)
                logits = self.step(next_id, pos)


def generate_tokens(model: Transformer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                    top_k: Optional[int] = None, top_p: Optional[float] = None, eos_id: Optional[int] = None,
                    generator: Optional[torch.Generator] = None, cuda_graph: bool = True) -> Iterator[int]:
    """One prompt's new token ids (batch 1), through a Decoder that is set up for this prompt
    alone and freed at the end. On CUDA the per-token step is captured as a CUDA graph unless
    cuda_graph=False. To decode several prompts, keep one Decoder: it sets up once.
    """
    decoder = Decoder(model, context_needed(model, prompt_ids, max_new_tokens), cuda_graph)
    try:
        yield from decoder.generate(prompt_ids, max_new_tokens, temperature, top_k, top_p, eos_id, generator)
    finally:
        decoder.close()


def build_model(model_dir: str, device: str, dtype: torch.dtype, quant: str = "none",
                adapter: Optional[str] = None) -> Transformer:
    """Load the base model (quantized while loading if asked) and apply a LoRA adapter if given."""
    quantize = None
    if quant != "none":
        from quant import make_quantize_fn
        quantize = make_quantize_fn(quant)  # quantizes each block as it is loaded
    model = load_model(model_dir, device=device, dtype=dtype, quantize=quantize)
    if adapter:
        from lora import load_adapter
        load_adapter(model, adapter)  # adapters are made on the device of the layer they wrap
    return model.eval()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder (HF layout or Meta layout), with tokenizer.model")
    p.add_argument("--prompt", help="raw text to continue")
    p.add_argument("--instruction", help="an instruction, wrapped in Stanford Alpaca's prompt template")
    p.add_argument("--input", default="", help="optional input/context for --instruction")
    p.add_argument("--chat", action="store_true",
                   help="answer instructions read from standard input, one per line, until its end "
                        "(Ctrl-D). Each is wrapped in Alpaca's template and answered on its own (the "
                        "template has no place for earlier turns); the model, its KV cache and its "
                        "CUDA graphs are set up once, not at every answer")
    p.add_argument("--adapter", help="folder of a trained LoRA adapter (adapter_model.safetensors)")
    p.add_argument("--quant", default="none", choices=["none", "nf4", "int4"], help="4-bit base weights")
    p.add_argument("--max-new-tokens", type=int, default=200, help="stop after this many new tokens")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 means greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass p")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: bfloat16 on cuda, float16 on a GPU without bf16 "
                        "such as a T4 or V100, float32 on cpu)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="fuse the kernels of RMSNorm, rotary and SwiGLU with torch.compile "
                        "(model.compile_pointwise; the first call compiles them, seconds). Default: on "
                        "with cuda (a 7B NF4 model on an H100: 3.3 instead of 5.0 ms per new token, "
                        "BENCHMARKS.md); off on cpu")
    args = p.parse_args(argv)
    if args.chat and (args.prompt is not None or args.instruction is not None):
        p.error("--chat reads its instructions from standard input: give neither --prompt nor --instruction")
    if not args.chat and (args.prompt is None) == (args.instruction is None):
        p.error("give exactly one of --prompt, --instruction or --chat")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        p.error(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.compile is None:
        args.compile = args.device.startswith("cuda")
    return args


def check_device(device: str) -> None:
    """A clear error for --device cuda where this torch sees no GPU (instead of an assertion deep in torch)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        why = (f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None else
               f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
        raise ValueError(f"--device {device}: {why}; use --device cpu")


def default_dtype(device: str) -> torch.dtype:
    """bf16 on a GPU that has it (compute capability 8.0 or more), fp16 on an older one, whose
    tensor cores have no bf16; fp32 on the CPU."""
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16


def stream(tokenizer, prompt_ids: list[int], tokens: Iterator[int], on_first=None) -> int:
    """Print the text of the new tokens as they come; return how many there were. on_first() is
    called when the first one comes."""
    new_ids, printed = [], ""
    prefix = tokenizer.decode(prompt_ids)
    for token in tokens:
        if not new_ids and on_first:
            on_first()
        new_ids.append(token)
        # Decode everything so far and print the new suffix: sentencepiece drops a token's leading
        # space when it is decoded alone, so the prompt is decoded with it and cut off again.
        full = tokenizer.decode(prompt_ids + new_ids)[len(prefix):]
        print(full[len(printed):], end="", flush=True)
        printed = full
    return len(new_ids)


def read_lines() -> Iterator[str]:
    """The lines typed (after a prompt) or piped in, stripped, until end of input."""
    while True:
        if sys.stdin.isatty():
            try:
                line = input("\n>>> ")
            except EOFError:
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
        if line.strip():
            yield line.strip()


def main(argv=None):
    args = parse_args(argv)
    check_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(args.device)
    tokenizer = load_tokenizer(args.model)
    model = build_model(args.model, args.device, dtype, args.quant, args.adapter)
    if args.compile:
        compile_pointwise()
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    sampling = (args.temperature, args.top_k, args.top_p, tokenizer.eos_id, generator)

    def answer(prompt_ids, decoder=None):
        room = model.args.max_seq_len - len(prompt_ids)
        if 0 < room < args.max_new_tokens:
            print(f"[at most {room} new tokens: the model's context is {model.args.max_seq_len} tokens and the "
                  f"prompt takes {len(prompt_ids)}]", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        tokens = (decoder.generate(prompt_ids, args.max_new_tokens, *sampling) if decoder else
                  generate_tokens(model, prompt_ids, args.max_new_tokens, *sampling))
        first = []  # when the first new token came: setup and prefill (on a first call, kernels compiled and tuned)
        n = stream(tokenizer, prompt_ids, tokens, on_first=lambda: first.append(time.perf_counter() - t0))
        dt = time.perf_counter() - t0
        print(flush=True)  # (stdout holds the answers alone, each ending its line)
        rate = f", then {(n - 1) / (dt - first[0]):.1f} tokens/s" if n > 1 and dt > first[0] else ""
        print(f"\n[{n} tokens in {dt:.2f} s: the first after {first[0] if first else dt:.2f} s{rate}]",
              file=sys.stderr, flush=True)

    if not args.chat:
        text = args.prompt if args.prompt is not None else format_prompt(args.instruction, args.input)
        ids = tokenizer.encode(text, bos=True)
        context_needed(model, ids, args.max_new_tokens)  # a prompt too long: its error before it is printed
        print(text, end="", flush=True)
        answer(ids)
        return
    print("One instruction per line (Ctrl-D ends).", file=sys.stderr, flush=True)
    decoder = Decoder(model)  # set up at the first answer, kept for the others
    for line in read_lines():
        try:
            answer(tokenizer.encode(format_prompt(line, ""), bos=True), decoder)
        except ValueError as e:  # a line too long for the context: say so, keep the chat going
            print(f"error: {e}", file=sys.stderr, flush=True)
    decoder.close()


def allocation(message: str) -> str:
    """What PyTorch's out-of-memory message (a paragraph) says was asked for: "Tried to allocate 2.00 GiB"."""
    tried = re.search(r"Tried to allocate [\d.]+ \w+", message)
    return tried.group(0) if tried else (message.splitlines() or ["no message"])[0]


def cli(argv=None):
    """main(), with the known errors as one line: a bad folder, adapter or prompt, or a GPU too small."""
    try:
        main(argv)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}")
    except torch.cuda.OutOfMemoryError as e:
        quant = "4-bit weights (--quant nf4, 3.5 GB for 7B), " if parse_args(argv).quant == "none" else ""
        sys.exit(f"error: out of GPU memory ({allocation(str(e))}): the weights and the KV cache must fit; try "
                 f"{quant}a shorter prompt or a smaller --max-new-tokens")


if __name__ == "__main__":
    cli()
