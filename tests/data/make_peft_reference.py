"""Write tests/data/peft_stories260K/ (a LoRA adapter saved by Hugging Face PEFT itself) and
tests/data/peft_stories260K_reference.json (transformers + PEFT logits with and without it).

    python tests/data/make_peft_reference.py      (from the repository root; needs transformers, peft)

The adapter: LoRA r = 4, alpha = 12 on q_proj, v_proj, o_proj, gate_proj and down_proj of
models/stories260K, every A and B drawn N(0, 0.1^2) (B = 0 at PEFT's init would hide mistakes).
The logits: float32 on the CPU for 12 tokens, at positions 0, 5 and 11, with the adapter and
without it (the base model)."""

import json
import os

import peft
import torch
import transformers

BASE = "models/stories260K"
OUT = os.path.join("tests", "data", "peft_stories260K")
TOKENS = [1, 403, 261, 352, 45, 318, 99, 270, 7, 481, 33, 200]
POSITIONS = [0, 5, 11]

torch.manual_seed(0)
hf = transformers.LlamaForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
x = torch.tensor([TOKENS])
with torch.no_grad():
    base = hf(x).logits[0]
config = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, task_type="CAUSAL_LM",
                         target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
model = peft.get_peft_model(hf, config).eval()
g = torch.Generator().manual_seed(7)
with torch.no_grad():
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    adapted = model(x).logits[0]
model.save_pretrained(OUT)
if os.path.exists(os.path.join(OUT, "README.md")):
    os.remove(os.path.join(OUT, "README.md"))  # PEFT's empty model card
ref = {"source": f"transformers {transformers.__version__}, peft {peft.__version__}, torch "
                 f"{torch.__version__}, float32 on the CPU",
       "tokens": TOKENS, "positions": POSITIONS,
       "logits_with_adapter": [adapted[p].tolist() for p in POSITIONS],
       "logits_base": [base[p].tolist() for p in POSITIONS]}
with open(os.path.join("tests", "data", "peft_stories260K_reference.json"), "w") as f:
    json.dump(ref, f)
print(ref["source"], sorted(os.listdir(OUT)))
