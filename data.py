"""Data for instruction tuning: the tokenizer, Stanford Alpaca's prompts, and supervised examples.

This file follows the data half of Stanford Alpaca's train.py (tatsu-lab/stanford_alpaca):
  - `Tokenizer`: a thin wrapper around the LLaMA sentencepiece model. LLaMA has no pad token and we
    add none (no embedding resize): padding uses an existing id and is masked out of the loss.
  - `PROMPT_DICT`: Alpaca's two prompt templates, with and without an `input` field.
"""

from __future__ import annotations

import os

import sentencepiece as spm

IGNORE_INDEX = -100  # label value that F.cross_entropy skips (its default ignore_index)

PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}


def format_prompt(instruction: str, input: str = "") -> str:
    """Alpaca's rule: the `prompt_input` template when `input` is non-empty, else `prompt_no_input`."""
    if input:
        return PROMPT_DICT["prompt_input"].format_map({"instruction": instruction, "input": input})
    return PROMPT_DICT["prompt_no_input"].format_map({"instruction": instruction})


class Tokenizer:
    """LLaMA's sentencepiece tokenizer: text <-> token ids.

    sentencepiece adds a "dummy prefix" space, so "Hello world" encodes as ["▁Hello", "▁world"].
    BOS/EOS are separate ids (1 and 2 for LLaMA); the text "</s>" is *not* the EOS id.
    """

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.vocab_size: int = self.sp.vocab_size()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)
