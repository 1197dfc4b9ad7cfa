"""LLaMA in plain PyTorch, and loading the checkpoints people download.

The architecture of LLaMA / Llama-2 / Mistral (Touvron et al. 2023), block by block:

    x = embed(tokens)
    for each block:
        x = x + Attention(RMSNorm(x))      # rotary positions, grouped-query attention
        x = x + SwiGLU-MLP(RMSNorm(x))
    logits = lm_head(RMSNorm(x))

Every linear is a plain `nn.Linear` with Hugging Face's name (q_proj, k_proj, v_proj, o_proj,
gate_proj, up_proj, down_proj), so quant.py and lora.py can swap them without special classes and
parameter names map 1:1 to checkpoint keys ("model." + name, except "lm_head.weight").

Loading reads a Hugging Face folder (config.json + model.safetensors or a sharded index) one tensor
at a time straight into the target dtype, or Meta's original layout (params.json +
consolidated.*.pth). A `quantize` callback, applied to each block as soon as its weights are on the
device, is the seam quant.py uses to quantize while loading.

Left out: rope scaling variants (Llama-3.1 "llama3", YaRN), sliding-window attention (Mistral's
window of 4096 only matters beyond 4096 tokens), biases in linears, tensor parallelism.
"""

from __future__ import annotations

import functools
import glob
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, noop_context_fn


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    vocab_size: int = 32000
    hidden_dim: int = 11008  # SwiGLU inner size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    head_dim: Optional[int] = None  # dim // n_heads unless the config says otherwise (Mistral-Nemo)

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """Read a Hugging Face config.json (LlamaConfig / MistralConfig keys)."""
        arch = (cfg.get("architectures") or ["?"])[0]
        if cfg.get("model_type") not in ("llama", "mistral") and arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r} (model_type {cfg.get('model_type')!r}); "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r} (LLaMA uses silu)")
        if cfg.get("rope_scaling"):
            raise ValueError(f"rope_scaling {cfg['rope_scaling']} is not supported by this implementation")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ValueError("linears with bias are not supported (LLaMA has none)")
        try:
            return cls(
                dim=cfg["hidden_size"],
                n_layers=cfg["num_hidden_layers"],
                n_heads=cfg["num_attention_heads"],
                n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                vocab_size=cfg["vocab_size"],
                hidden_dim=cfg["intermediate_size"],
                norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=cfg.get("rope_theta", 10000.0),
                max_seq_len=cfg.get("max_position_embeddings", 4096),
                tie_embeddings=cfg.get("tie_word_embeddings", False),
                head_dim=cfg.get("head_dim"),
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks the key {e.args[0]!r}") from None

    def to_hf_config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.dim, "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim, "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_seq_len, "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "rope_scaling": None,
        }


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 (as the reference does)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return POINTWISE["rms_norm"](x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings (RoPE, Su et al. 2021)
#
# RoPE rotates pairs of features of q and k by an angle pos * theta^(-2i/d). Meta's code pairs
# *adjacent* features (2i, 2i+1). Hugging Face pairs feature i with feature i + d/2 ("rotate
# half"), which is cheaper to write; to keep the same model, HF's conversion script permutes the
# rows of every q_proj / k_proj weight within each head:  rows (0,1,2,3,...) -> (0,2,4,...,1,3,5,...).
# HF checkpoints are therefore stored permuted and must be used with rotate-half. Loading Meta's
# consolidated.*.pth needs the same permutation (see `permute_meta_to_hf`); forgetting it is the
# classic porting bug: the model still runs, and turns to gibberish after a few tokens.
# ----------------------------------------------------------------------------------------------

def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape positions.shape + (head_dim,), in float32, in rotate-half layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (..., head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)       # feature i and i + d/2 share an angle
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D), cos and sin (B or 1, T, 1, D); (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
    for halves x1, x2. (Applied before the heads are moved in front of T: x is then the projection's
    contiguous output, and a fused kernel streams it in order.)"""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def apply_rope_k(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope for the keys: the same math as a function of its own, so that compiled, q and k
    each keep their number of heads as a constant (with grouped-query attention they differ, and
    one function seeing both would turn the number into a symbol: compile_pointwise)."""
    return apply_rope(k, cos, sin)


class KVCache(nn.Module):
    """Keys and values of past positions, written in place at `input_pos` (for decoding)."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads: n_heads queries share n_kv_heads keys/values."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, cos, sin, mask: Optional[torch.Tensor], input_pos: Optional[torch.Tensor]):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        # (the three projections back to back: when decoding, each 4-bit matmul kernel lets the next
        # one start early, kernels/decode_sm90.py; rotary between them cost 4% per token)
        q, k = POINTWISE["apply_rope"](q, cos, sin), POINTWISE["apply_rope_k"](k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        if self.n_kv_heads != self.n_heads:
            # Grouped-query attention: each key/value head serves n_heads / n_kv_heads query heads.
            # (SDPA's enable_gqa does this without a copy, but not on every backend and torch version.)
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        # With no mask, is_causal lets SDPA pick the flash-attention kernel on the GPU.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# The model's pointwise functions, looked up here at every call so that `compile_pointwise` can
# swap in fused versions. Eager PyTorch runs RMSNorm as ~6 kernels and rotary as ~5, each reading
# and writing the whole activation; on a GPU torch.compile fuses each function into one kernel.
EAGER_POINTWISE = {"rms_norm": rms_norm, "apply_rope": apply_rope, "apply_rope_k": apply_rope_k, "swiglu": swiglu}
POINTWISE = dict(EAGER_POINTWISE)


@functools.lru_cache(maxsize=None)
def _compiled_pointwise() -> dict:
    """The pointwise functions through torch.compile, made once per process. Each compiles at its first
    call for that call's exact shapes, and once more at the first call with other shapes, then with only
    the sizes that changed as symbols (torch's automatic dynamic shapes; again for a new kind of call:
    with autograd, without). So the heads and the head size stay constants, and rotary's index
    arithmetic (which element of cos and sin a thread reads) stays cheap: with every size a symbol
    (dynamic=True), its kernel took 191 against 50 us at (8, 512, 32, 128) on an H100 (BENCHMARKS.md)."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config
    # Training meets more kinds of call than torch's default of 8 compiled versions per function, after
    # which it would run the function eagerly: inputs that need a gradient or not (the first block's
    # input, from the frozen embedding, does not), grad mode on and off (the held-out loss, samples),
    # the first shapes and then symbolic ones.
    # (cache_size_limit: torch 2.7 renamed it recompile_limit and kept this name as an alias)
    dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 64)
    options = {"triton.enable_pdl": True} if hasattr(inductor_config.triton, "enable_pdl") else {}
    return {name: torch.compile(fn, options=options) for name, fn in EAGER_POINTWISE.items()}


def compile_pointwise(on: bool = True) -> dict:
    """Swap in the torch.compile'd pointwise functions (on) or the eager ones (off): the same math in
    one fused kernel each instead of ~5 (rounding aside: the fused kernel keeps its float32
    intermediates in registers). Returns the functions in place before, for restoring.

    Where it pays: wherever launches cost nothing, so that the step's time is its kernels' time.
      - generate.py on CUDA: batch-1 decoding of a 7B NF4 model went from 5.0 to 3.3 ms per token
        on an H100 (BENCHMARKS.md).
      - train.py under CUDA graphs: a 7B NF4 LoRA step at 8 x 512 with checkpointing and dropout
        0.05 went from 7,845 to 9,687 tok/s on an H100, then to 10,457 with the sizes that never
        change compiled as constants (BENCHMARKS.md, thirty-second session).
    Eager training leaves it off: there the compiled functions' host time per call costs about what
    they save (7B, 8 x 512, in one process: 4,968 tok/s compiled against 5,857 eager).

    On Hopper the compiled kernels use programmatic dependent launch where this torch has it
    (Inductor's triton.enable_pdl): each lets the kernel after it start before it ends, so a
    4-bit decoding kernel that follows a norm or SwiGLU (kernels/decode_sm90.py) fills its tables
    and brings its first weights meanwhile: 3.28 -> 3.19 ms per token on an H100."""
    return set_pointwise(_compiled_pointwise() if on else EAGER_POINTWISE)


def set_pointwise(table: dict) -> dict:
    """Put these pointwise functions in place (compile_pointwise's tables, or what it returned);
    returns the ones in place before."""
    before = dict(POINTWISE)
    POINTWISE.update(table)
    return before


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down( silu(gate(x)) * up(x) )."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(POINTWISE["swiglu"](self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, mask=None, input_pos=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False
        # torch.utils.checkpoint's context_fn: (forward, recomputation) context managers for each
        # checkpointed block. lora.add_lora sets it so that a block's recomputation sees the dropout
        # seed of its own forward (dropout.Seed.checkpoint_contexts).
        self.checkpoint_contexts = noop_context_fn

    def setup_cache(self, batch_size: int, max_seq_len: int):
        """Allocate a KV cache in every block (for decoding); `remove_cache` frees it."""
        w = self.embed_tokens.weight
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, max_seq_len, self.args.n_kv_heads,
                                               self.args.head_dim, w.dtype, w.device)

    def remove_cache(self):
        for layer in self.layers:
            layer.self_attn.kv_cache = None

    def forward(self, tokens: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
                doc_ids: Optional[torch.Tensor] = None, return_hidden: bool = False) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab), or the final-normed hidden states (B, T, dim).

        input_pos: positions (T,) or (B, T); default 0..T-1. With a KV cache it must be 1-D and
                   says where these tokens go in the cache.
        doc_ids:   (B, T) for packed rows: a token attends only to earlier tokens of its own
                   document (pass input_pos restarting at 0 for each document).
        """
        B, T = tokens.shape
        cached = self.layers[0].self_attn.kv_cache is not None
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device)
        cos, sin = rope_cos_sin(input_pos, self.args.head_dim, self.args.rope_theta)
        # (B or 1, T, 1, D): broadcast over the heads of q and k, laid out (B, T, heads, D)
        cos, sin = (cos[None, :, None], sin[None, :, None]) if input_pos.dim() == 1 else (cos[:, :, None], sin[:, :, None])

        mask = None  # None means plain causal attention over these T tokens
        if cached:
            # Query at position p sees cache slots 0..p (later slots hold stale or zero entries).
            max_len = self.layers[0].self_attn.kv_cache.k.shape[2]
            mask = input_pos[:, None] >= torch.arange(max_len, device=tokens.device)[None, :]
        elif doc_ids is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
            mask = (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]  # (B, 1, T, T)

        x = self.embed_tokens(tokens)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only each block's input; recompute its insides during backward. Saving the
                # RNG state (for dropout) cannot be captured in a CUDA graph (graph_step.py).
                x = checkpoint(layer, x, cos, sin, mask, input_pos if cached else None, use_reentrant=False,
                               preserve_rng_state=not (x.is_cuda and torch.cuda.is_current_stream_capturing()),
                               context_fn=self.checkpoint_contexts)
            else:
                x = layer(x, cos, sin, mask, input_pos if cached else None)
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)


# ----------------------------------------------------------------------------------------------
# Loading checkpoints
# ----------------------------------------------------------------------------------------------

def hf_key(name: str) -> str:
    """Our parameter name -> Hugging Face checkpoint key."""
    return name if name.startswith("lm_head.") else "model." + name


def permute_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows per head from Meta's interleaved pairs (2i, 2i+1) to HF's halves (i, i+d/2)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _read_json(path: str) -> dict:
    """json.load with the file's name in the error (a truncated download is a common cause)."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _check_folder(folder: str):
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder not found: {folder}")


def load_tokenizer(folder: str):
    from data import Tokenizer  # model.py stays free of data at import time
    _check_folder(folder)
    path = os.path.join(folder, "tokenizer.model")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no tokenizer.model (a sentencepiece model is needed)")
    return Tokenizer(path)


def _hf_tensor_reader(folder: str):
    """Return (keys, read(key) -> tensor) over model.safetensors or a sharded index."""
    from safetensors import safe_open

    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index):
        weight_map = _read_json(index)["weight_map"]
    elif os.path.isfile(single):
        weight_map = None
    else:
        bins = glob.glob(os.path.join(folder, "pytorch_model*.bin"))
        hint = " (found pytorch_model*.bin: convert it to safetensors first)" if bins else ""
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json{hint}")
    handles = {}

    def handle(fname):  # open each shard once; tensors are read lazily, one at a time
        if fname not in handles:
            path = os.path.join(folder, fname)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"shard {path} named in the index is missing")
            handles[fname] = safe_open(path, framework="pt", device="cpu")
        return handles[fname]

    if weight_map is None:
        keys = set(handle("model.safetensors").keys())
        return keys, lambda k: handle("model.safetensors").get_tensor(k)
    return set(weight_map), lambda k: handle(weight_map[k]).get_tensor(k)


# Meta checkpoint names -> ours, and the dimension along which model-parallel shards are split.
_META_NAMES = {
    "attention.wq": ("self_attn.q_proj", 0), "attention.wk": ("self_attn.k_proj", 0),
    "attention.wv": ("self_attn.v_proj", 0), "attention.wo": ("self_attn.o_proj", 1),
    "feed_forward.w1": ("mlp.gate_proj", 0), "feed_forward.w3": ("mlp.up_proj", 0),
    "feed_forward.w2": ("mlp.down_proj", 1), "attention_norm": ("input_layernorm", None),
    "ffn_norm": ("post_attention_layernorm", None),
}


def _meta_args(folder: str) -> tuple[ModelArgs, list[str]]:
    p = _read_json(os.path.join(folder, "params.json"))
    shards = sorted(glob.glob(os.path.join(folder, "consolidated.*.pth")))
    if not shards:
        raise FileNotFoundError(f"{folder} has params.json but no consolidated.*.pth")
    dim = p["dim"]
    hidden = int(2 * 4 * dim / 3)  # Meta's rule for the SwiGLU width
    if p.get("ffn_dim_multiplier"):
        hidden = int(p["ffn_dim_multiplier"] * hidden)
    multiple_of = p.get("multiple_of", 256)
    hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
    vocab = p.get("vocab_size", -1)
    if vocab <= 0:  # Llama-2 params.json says -1: read it off the embedding
        first = torch.load(shards[0], map_location="cpu", weights_only=True, mmap=True)
        vocab = first["tok_embeddings.weight"].shape[0]
    args = ModelArgs(dim=dim, n_layers=p["n_layers"], n_heads=p["n_heads"],
                     n_kv_heads=p.get("n_kv_heads") or p["n_heads"], vocab_size=vocab, hidden_dim=hidden,
                     norm_eps=p.get("norm_eps", 1e-5), rope_theta=p.get("rope_theta", 10000.0),
                     max_seq_len=p.get("max_seq_len", 4096), tie_embeddings=False)
    return args, shards


def _meta_tensor_reader(folder: str, args: ModelArgs):
    """Read Meta's consolidated.*.pth (model-parallel shards), renamed and permuted to our layout."""
    _, shards = _meta_args(folder)
    parts = [torch.load(s, map_location="cpu", weights_only=True, mmap=True) for s in shards]
    ours = {}  # our name -> (meta name, concat dim)
    for key in parts[0]:
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            sub = rest.rsplit(".", 1)[0]
            if sub not in _META_NAMES:
                ours[key] = (key, None)  # unknown: reported as unexpected
                continue
            name, dim = _META_NAMES[sub]
            ours[f"layers.{i}.{name}.weight"] = (key, dim)
        elif key == "tok_embeddings.weight":
            ours["embed_tokens.weight"] = (key, 1)
        elif key == "output.weight":
            ours["lm_head.weight"] = (key, 0)
        elif key == "norm.weight":
            ours["norm.weight"] = (key, None)
        elif key != "rope.freqs":
            ours[key] = (key, None)

    def read(name):
        key, dim = ours[name]
        t = parts[0][key] if dim is None or len(parts) == 1 else torch.cat([p[key] for p in parts], dim=dim)
        if name.endswith("q_proj.weight"):
            t = permute_meta_to_hf(t, args.n_heads)
        elif name.endswith("k_proj.weight"):
            t = permute_meta_to_hf(t, args.n_kv_heads)
        return t

    return {hf_key(n) for n in ours}, lambda k: read(k[len("model."):] if k.startswith("model.") else k)


def read_args(folder: str) -> ModelArgs:
    _check_folder(folder)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return ModelArgs.from_hf_config(_read_json(os.path.join(folder, "config.json")))
    if os.path.isfile(os.path.join(folder, "params.json")):
        return _meta_args(folder)[0]
    raise FileNotFoundError(f"{folder} is not a LLaMA checkpoint: it has neither config.json (Hugging Face "
                            f"layout) nor params.json (Meta layout)")


def load_model(folder: str, device="cpu", dtype: torch.dtype = torch.float32,
               quantize: Optional[Callable[[nn.Module], None]] = None) -> Transformer:
    """Build the model on the meta device (no memory), then fill it one tensor at a time.

    Each block is materialized on `device` in `dtype`, filled, and handed to `quantize` (if given)
    before the next is made, so at most one block's 16-bit weights exist at a time beyond what
    `quantize` keeps. Raises a clear error for missing, unexpected or wrongly shaped tensors.
    """
    args = read_args(folder)
    if os.path.isfile(os.path.join(folder, "config.json")):
        keys, read = _hf_tensor_reader(folder)
    else:
        keys, read = _meta_tensor_reader(folder, args)
    # Older HF checkpoints store rotary inv_freq buffers; we compute them, so ignore those.
    keys = {k for k in keys if not k.endswith("rotary_emb.inv_freq")}
    with torch.device("meta"):
        model = Transformer(args).to(dtype)  # costs nothing: meta tensors hold no data

    expected = {hf_key(n) for n, _ in model.named_parameters()}  # tied lm_head is not listed twice
    missing = sorted(expected - keys)
    unexpected = sorted(keys - expected - ({"lm_head.weight"} if args.tie_embeddings else set()))
    if missing:
        raise KeyError(f"{folder}: checkpoint lacks {len(missing)} tensor(s), first: {missing[:3]}")
    if unexpected:
        raise KeyError(f"{folder}: checkpoint has {len(unexpected)} unexpected tensor(s), first: {unexpected[:3]}")

    def fill(module: nn.Module, prefix: str):
        module.to_empty(device=device)
        for name, p in module.named_parameters(recurse=True):
            key = hf_key(prefix + name)
            t = read(key)
            if t.shape != p.shape:
                raise ValueError(f"{folder}: tensor {key} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(t)  # one tensor at a time, cast on copy: no float32 copy of the whole model

    for name in ("embed_tokens", "norm"):
        fill(getattr(model, name), name + ".")
    if args.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    else:
        fill(model.lm_head, "lm_head.")
    for i, block in enumerate(model.layers):
        fill(block, f"layers.{i}.")
        if quantize is not None:
            quantize(block)
    return model.eval()


def save_hf_checkpoint(state_dict: dict, args: ModelArgs, folder: str, max_shard_bytes: Optional[int] = None):
    """Write `state_dict` (our names) as a Hugging Face folder: config.json + (sharded) safetensors."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tensors = {hf_key(k): v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if args.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    shards, current, size = [], {}, 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if max_shard_bytes and current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k], size = v, size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(folder, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(args.to_hf_config(), f, indent=2)
