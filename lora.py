"""LoRA: low-rank adapters on frozen linears, saved in PEFT's layout (Hu et al. 2021, "LoRA").

A frozen linear y = W x (W: out x in) gets a trainable low-rank update (LoRA paper, section 4.1):

    y = W x + (alpha / r) * B A x          A: r x in,  B: out x r,  r << min(in, out)

  - A starts Kaiming-uniform and B starts at zero, so B A = 0: at step 0 the adapted model *is* the
    base model, and training moves away from it smoothly.
  - The update is scaled by alpha / r, alpha a constant in r. With Adam, tuning alpha is roughly
    tuning the learning rate, and the 1/r factor means alpha (set once) need not be re-tuned when
    r changes (LoRA 4.1). QLoRA found that adapters on *every* linear of the block (q, k, v, o,
    gate, up, down) are needed to match 16-bit full fine-tuning (QLoRA paper, section 4; its runs
    use r = 64, alpha = 16), which is what `add_lora`'s default targets do.
  - The base W can be anything that maps x to W x and has `in_features`/`out_features`: a plain
    nn.Linear, or quant.py's 4-bit linear (QLoRA: the base is stored in NF4 and dequantized on the
    fly, gradients flow *through* it to the adapters but never *into* it).

Precision: the adapter weights are stored in float32 by default (they are what the optimizer
updates; small updates to bf16 weights would round away), while the arithmetic runs in the
activation dtype (bf16 on the GPU), as autocast would: A and B are cast down (r x in elements, cheap)
instead of casting the activations up (tokens x in elements).

Names follow PEFT so that adapters move between this code and the Hugging Face stack: our parameter
`layers.0.self_attn.q_proj.lora_A.weight` is PEFT's key
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` in `adapter_model.safetensors`,
next to an `adapter_config.json`. `peft.PeftModel.from_pretrained` loads what `save_adapter` writes
and `load_adapter` loads what PEFT writes (for plain LoRA: no DoRA, rsLoRA, per-layer ranks, or
biases; those are refused with an error, not silently mis-loaded).

`merge_lora` folds B A into W (dequantizing 4-bit W first) for adapter-free inference, and
`export_merged` writes the merged model as a 16-bit Hugging Face checkpoint.

Left out: LoRA on embeddings, LoRA dropout variants, unmerging, multiple adapters per model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import noop_context_fn

from dropout import Seed, dropout_down

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PeftModel wraps a LoraModel which wraps the HF *ForCausalLM


class LoRALinear(nn.Module):
    """base(x) + (alpha / r) * lora_B(lora_A(dropout(x))), with `base` frozen.

    Submodule names are PEFT's (`lora_A`, `lora_B`) so parameter names map 1:1 to PEFT keys;
    `base` is treated as an opaque module with `in_features` and `out_features`.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 lora_dtype: torch.dtype = torch.float32, seed: Optional[Seed] = None, salt: int = 0):
        super().__init__()
        if not (hasattr(base, "in_features") and hasattr(base, "out_features")):
            raise TypeError(f"LoRA needs a linear-like module with in_features/out_features, got {type(base).__name__}")
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha = r, alpha
        self.scale = alpha / r  # LoRA section 4.1: the update B A x is scaled by alpha / r
        device = _module_device(base)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=lora_dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=lora_dtype)
        # Dropout on the adapter's input, with masks hashed from a seed (dropout.py): add_lora gives all
        # adapters of a model one Seed, drawn once per forward of the model, and each its own salt.
        # A LoRALinear made alone (seed None) draws its own seed at each of its forwards.
        self.dropout, self.salt = dropout, salt
        self.seed = (seed or Seed(self, device)) if dropout > 0 else None
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self):
        """PEFT's init: A ~ Kaiming-uniform(a=sqrt(5)) (= U(-1/sqrt(in), 1/sqrt(in))), B = 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:  # (checked here: the reshape below would not notice)
            raise ValueError(f"input has {x.shape[-1]} features in its last dim, the layer expects {self.in_features}")
        shape = (*x.shape[:-1], self.out_features)
        x = x.reshape(-1, self.in_features)  # 2-D, so that the base's output is a tensor, not a view
        out = self.base(x)
        if out.dtype != x.dtype:  # a base that computes in another dtype: hand back x's dtype
            out = out.to(x.dtype)
        # Compute in x's dtype: cast the small adapter matrices, not the activations.
        a = self.lora_A.weight.to(x.dtype)
        b = self.lora_B.weight.to(x.dtype)
        if self.training and self.dropout > 0:
            low = dropout_down(x, a, self.seed.value, self.salt, self.dropout)  # (M, r): A drop(x)
        else:
            low = F.linear(x, a)  # (M, r): A x
        # out + scale * (A x) B^T as one GEMM that accumulates into the base's output, in place: no
        # backward keeps that output, and addmm would first copy it to a new tensor. out must not be a
        # view: autograd would record an in-place write to a view (CopySlices), whose backward copies
        # the whole gradient.
        return out.addmm_(low, b.t(), alpha=self.scale).view(shape)

    @torch.no_grad()
    def base_weight(self) -> torch.Tensor:
        """The frozen W as a dense (out, in) tensor: `base.weight` for nn.Linear, else `base.dequantize()`."""
        if isinstance(self.base, nn.Linear):
            return self.base.weight
        if hasattr(self.base, "dequantize"):
            return self.base.dequantize()
        raise TypeError(f"cannot merge into {type(self.base).__name__}: it is not nn.Linear and has no dequantize()")

    @torch.no_grad()
    def merged_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """W + (alpha / r) B A, summed in float32, returned in `dtype` (default: W's dtype)."""
        w = self.base_weight()
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
        return (w.float() + self.scale * delta.to(w.device)).to(dtype or w.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, dropout={self.dropout}"


def _module_device(m: nn.Module) -> torch.device:
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device
    return torch.device("cpu")


def _base_bias(base: nn.Module) -> Optional[torch.Tensor]:
    b = getattr(base, "bias", None)
    return b if isinstance(b, torch.Tensor) else None


def is_lora_param(name: str) -> bool:
    """True for adapter weights (`...lora_A.weight`, `...lora_B.weight`)."""
    parts = name.split(".")
    return "lora_A" in parts or "lora_B" in parts


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """name -> LoRALinear for every adapted linear in the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.05,
             targets: Iterable[str] = DEFAULT_TARGETS,
             lora_dtype: torch.dtype = torch.float32) -> dict[str, nn.Parameter]:
    """Wrap every linear whose attribute name is in `targets` in a LoRALinear; freeze all the rest.

    Matching is by attribute name ("q_proj" matches layers.*.self_attn.q_proj). Returns the
    trainable parameters, name -> parameter, which are exactly the adapters' A and B.
    Raises if a target matches nothing, matches a non-linear module, or LoRA is already applied.
    """
    targets = tuple(targets)
    if not targets:
        raise ValueError("add_lora: no target module names given")
    if lora_modules(model):
        raise ValueError("add_lora: the model already has LoRA adapters (merge_lora or a fresh model first)")
    # Find every site first and check them all, so that a bad target leaves the model untouched.
    sites = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if name in targets]
    missing = [t for t in targets if not any(name == t for _, name, _ in sites)]
    if missing:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "in_features")})
        raise ValueError(f"add_lora: target(s) {missing} match no module; linear layers here are named {linear_names}")
    for _, name, child in sites:
        if not (hasattr(child, "in_features") and hasattr(child, "out_features")):
            raise TypeError(f"add_lora: target {name!r} is a {type(child).__name__}, not a linear layer")
    for p in model.parameters():
        p.requires_grad_(False)
    seed = Seed(model, _module_device(model)) if dropout > 0 else None
    if seed is not None and hasattr(model, "checkpoint_contexts"):  # model.Transformer's checkpointing
        model.checkpoint_contexts = seed.checkpoint_contexts
    for salt, (parent, name, child) in enumerate(sites):
        # one seed per forward of the model, a salt per adapter (dropout.py)
        adapter = LoRALinear(child, r, alpha, dropout, lora_dtype, seed=seed, salt=salt)
        adapter.train(child.training)  # follow the model's train/eval mode (dropout)
        setattr(parent, name, adapter)
    trainable = {n: p for n, p in model.named_parameters() if is_lora_param(n)}
    for p in trainable.values():
        p.requires_grad_(True)
    return trainable


@torch.no_grad()
def merge_lora(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace each LoRALinear by a plain nn.Linear with weight W + (alpha / r) B A (in place).

    W is dequantized first when the base is 4-bit; `dtype` defaults to W's dtype (for a 4-bit base:
    the dtype `dequantize()` returns). The merged linears are frozen like the rest of the base.
    """
    if hasattr(model, "checkpoint_contexts"):
        model.checkpoint_contexts = noop_context_fn
    for name, m in list(lora_modules(model).items()):
        if m.seed is not None:
            m.seed.remove()  # no adapters, no dropout: stop drawing seeds (removing twice is harmless)
        w = m.merged_weight(dtype)
        bias = _base_bias(m.base)
        merged = nn.Linear(m.in_features, m.out_features, bias=bias is not None, device=w.device, dtype=w.dtype)
        merged.weight.copy_(w)
        if bias is not None:
            merged.bias.copy_(bias)
        merged.requires_grad_(False)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, merged)
    return model


# ----------------------------------------------------------------------------------------------
# Saving and loading adapters in PEFT's layout
# ----------------------------------------------------------------------------------------------

def _hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face model's ("model." prefix, except the LM head)."""
    return name if name.startswith("lm_head.") else "model." + name


def to_peft_key(name: str) -> str:
    """`layers.0.self_attn.q_proj.lora_A.weight` -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    return PEFT_PREFIX + _hf_name(name)


def from_peft_key(key: str) -> str:
    """Inverse of `to_peft_key`."""
    if not key.startswith(PEFT_PREFIX):
        raise KeyError(f"{key!r} is not a PEFT adapter key (expected the prefix {PEFT_PREFIX!r})")
    name = key[len(PEFT_PREFIX):]
    return name[len("model."):] if name.startswith("model.") else name


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our-name -> tensor for every adapter weight (lora_A / lora_B), detached."""
    return {n: p.detach() for n, p in model.named_parameters() if is_lora_param(n)}


def _lora_hparams(model: nn.Module) -> tuple[int, float, float, list[str]]:
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters (call add_lora first)")
    rs = {m.r for m in mods.values()}
    alphas = {m.alpha for m in mods.values()}
    if len(rs) != 1 or len(alphas) != 1:
        raise ValueError(f"adapters with mixed rank/alpha ({sorted(rs)}, {sorted(alphas)}) are not supported")
    dropouts = {m.dropout for m in mods.values()}
    targets = sorted({n.rsplit(".", 1)[-1] for n in mods})
    return rs.pop(), alphas.pop(), max(dropouts), targets


def atomic_write(path: str, write) -> None:
    """Write via `write(tmp_path)` to a temporary file in the same folder, flush it to disk, then
    rename it over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # The usual permissions, set after the write: mkstemp makes owner-only files, and so does
        # safetensors' save_file, which replaces the file it is given.
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # on disk before the rename: a power cut cannot leave a renamed empty file
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new, never half of one
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_json(path: str, obj: dict) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


def _write_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def adapter_config(model: nn.Module, base_model_path: Optional[str] = None) -> dict:
    """PEFT's adapter_config.json fields for the adapters in `model` (plain LoRA)."""
    r, alpha, dropout, targets = _lora_hparams(model)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(model: nn.Module, out_dir: str, base_model_path: Optional[str] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
    """Write out_dir/adapter_model.safetensors (PEFT key names) and out_dir/adapter_config.json.

    Each file is written to a temporary file in out_dir and renamed, so a crash mid-save leaves
    the previous adapter intact. `dtype` casts the saved weights (default: as stored, float32).
    """
    os.makedirs(out_dir, exist_ok=True)
    config = adapter_config(model, base_model_path)
    tensors = {to_peft_key(n): (t.to(dtype) if dtype else t) for n, t in lora_state_dict(model).items()}
    _write_safetensors(os.path.join(out_dir, ADAPTER_WEIGHTS), tensors)
    _write_json(os.path.join(out_dir, ADAPTER_CONFIG), config)


def read_adapter_config(adapter_dir: str) -> dict:
    """Read and check adapter_config.json: plain LoRA only (what this file implements)."""
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {adapter_dir}")
    with open(path) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise ValueError(f"{path}: missing the field {key!r}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg['peft_type']!r} is not LORA")
    unsupported = {
        "use_dora": cfg.get("use_dora"), "use_rslora": cfg.get("use_rslora"),
        "fan_in_fan_out": cfg.get("fan_in_fan_out"), "rank_pattern": cfg.get("rank_pattern"),
        "alpha_pattern": cfg.get("alpha_pattern"), "modules_to_save": cfg.get("modules_to_save"),
    }
    bad = {k: v for k, v in unsupported.items() if v}
    if cfg.get("bias", "none") != "none":
        bad["bias"] = cfg["bias"]
    if not isinstance(cfg["target_modules"], list):
        bad["target_modules"] = cfg["target_modules"]  # a regex string or "all-linear"
    if bad:
        raise ValueError(f"{path}: unsupported LoRA options {bad} (only plain LoRA with a list of target names)")
    return cfg


def load_adapter(model: nn.Module, adapter_dir: str, lora_dtype: torch.dtype = torch.float32) -> dict:
    """Load a PEFT LoRA adapter (ours or PEFT's) into `model`; returns its config.

    Applies `add_lora` with the config's r / lora_alpha / target_modules unless the model already
    has adapters (then they must agree). Every adapter weight must be present with the right shape.
    """
    from safetensors.torch import load_file

    cfg = read_adapter_config(adapter_dir)
    r, alpha, targets = int(cfg["r"]), float(cfg["lora_alpha"]), sorted(cfg["target_modules"])
    if lora_modules(model):
        have_r, have_alpha, _, have_targets = _lora_hparams(model)
        if (have_r, float(have_alpha), have_targets) != (r, alpha, targets):
            raise ValueError(f"{adapter_dir}: adapter has r={r}, alpha={alpha}, targets={targets} but the model's "
                             f"adapters have r={have_r}, alpha={have_alpha}, targets={have_targets}")
    else:
        add_lora(model, r=r, alpha=alpha, dropout=float(cfg.get("lora_dropout", 0.0)), targets=targets,
                 lora_dtype=lora_dtype)
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {adapter_dir}")
    loaded = {}
    for key, t in load_file(path).items():
        try:
            loaded[from_peft_key(key)] = (key, t)
        except KeyError as e:
            raise KeyError(f"{path}: {e.args[0]}") from None
    params = dict(lora_state_dict(model))
    missing = sorted(set(params) - set(loaded))
    unexpected = sorted(set(loaded) - set(params))
    if missing:
        raise KeyError(f"{path}: lacks {len(missing)} adapter weight(s), first: {[to_peft_key(n) for n in missing[:3]]}")
    if unexpected:
        raise KeyError(f"{path}: has {len(unexpected)} unexpected key(s) for this model, first: "
                       f"{[loaded[n][0] for n in unexpected[:3]]}")
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, (key, t) in loaded.items():
            p = named[name]
            if t.shape != p.shape:
                raise ValueError(f"{path}: {key} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}")
            p.copy_(t)
    return cfg


# ----------------------------------------------------------------------------------------------
# Exporting a merged 16-bit checkpoint (Hugging Face layout)
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def merged_state_dict(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Our-name -> dense tensor for the model with adapters folded in and 4-bit weights dequantized.

    Does not modify the model. A LoRALinear contributes `name.weight` = W + (alpha / r) B A; a
    quantized linear (has `dequantize()`, is not nn.Linear) contributes its dequantized weight; other
    modules contribute their parameters (buffers such as caches are not model weights). A tensor
    shared by two modules (tied embeddings) is listed once, under its first name.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def visit(module: nn.Module, prefix: str):
        bias = None
        if isinstance(module, LoRALinear):
            out[prefix + "weight"] = module.merged_weight(dtype)
            bias = _base_bias(module.base)
        elif not isinstance(module, nn.Linear) and hasattr(module, "dequantize") and hasattr(module, "in_features"):
            out[prefix + "weight"] = module.dequantize().to(dtype)
            bias = _base_bias(module)
        else:
            for name, p in module.named_parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    out[prefix + name] = p.detach().to(dtype)
            for name, child in module.named_children():
                visit(child, prefix + name + ".")
            return
        if bias is not None:
            out[prefix + "bias"] = bias.detach().to(dtype)

    visit(model, "")
    return out


def export_merged(model: nn.Module, out_dir: str, hf_config: dict, tokenizer_path: Optional[str] = None,
                  dtype: torch.dtype = torch.bfloat16) -> None:
    """Write a merged 16-bit Hugging Face checkpoint: config.json, model.safetensors, tokenizer.model.

    `hf_config` is the base model's config.json as a dict (e.g. `model.args.to_hf_config()`);
    its dtype and embedding tying are updated to match what is written. Keys follow Hugging Face
    ("model." + name, except "lm_head.weight"), so `model.load_model(out_dir)` and
    `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` both load it. Does not modify the
    model; each file is written atomically.
    """
    os.makedirs(out_dir, exist_ok=True)
    state = merged_state_dict(model, dtype)
    tensors = {_hf_name(n): t for n, t in state.items()}
    config = dict(hf_config)
    # Tied embeddings are written once (as model.embed_tokens.weight); if the LM head got its own
    # weights (LoRA on lm_head), the checkpoint is untied.
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    _write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors)
    _write_json(os.path.join(out_dir, "config.json"), config)
    if tokenizer_path is not None:
        if not os.path.isfile(tokenizer_path):
            raise FileNotFoundError(f"tokenizer model not found: {tokenizer_path}")
        atomic_write(os.path.join(out_dir, "tokenizer.model"), lambda tmp: shutil.copyfile(tokenizer_path, tmp))
