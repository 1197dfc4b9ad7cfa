"""Data for instruction tuning: read Alpaca records, tokenize with masked prompts, batch or pack.

This file follows the data half of Stanford Alpaca's train.py (tatsu-lab/stanford_alpaca), and, as
both it and QLoRA's qlora.py do by default (train_on_source=False), trains on the response only:
  - `Tokenizer`: a thin wrapper around the LLaMA sentencepiece model. LLaMA has no pad token and we
    add none (no embedding resize): padding uses an existing id (EOS) and is masked out of the loss.
  - `PROMPT_DICT`: Alpaca's two prompt templates, with and without an `input` field.
  - `load_records`: Alpaca JSON (a list of {instruction, input, output}) or JSON Lines, checked
    record by record with errors that name the file and the record.
  - `tokenize_example` / `SupervisedDataset`: input_ids = [BOS] + prompt + response + [EOS], with
    labels = IGNORE_INDEX over BOS and the prompt, so only the response and EOS are learned.
  - Batching: `DataCollatorForSupervisedDataset` (right padding), `length_grouped_batches`
    (Hugging Face's group_by_length), and packing (`pack_rows`, `collate_packed`): several examples
    per row, each attending only to itself. `make_batches` gives train.py either kind, as a pure
    function of (seed, epoch), indexable so a resumed run can start at batch k.

Label convention (Hugging Face's): labels are aligned with input_ids, labels[t] is the token at t,
and the loss shifts by one (the logits at position t are scored against labels[t + 1]).

Left out: multi-turn chat formats, system prompts, streaming datasets that do not fit in memory.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import sentencepiece as spm
import torch

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

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of each text (no BOS/EOS), in one call (sentencepiece uses several threads)."""
        return self.sp.encode(list(texts)) if texts else []

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)


# ----------------------------------------------------------------------------------------------
# Reading records
# ----------------------------------------------------------------------------------------------

Record = dict  # {"instruction": str, "input": str, "output": str}


EMPTY_OUTPUT_RULES = ("skip", "error")


def _check_record(rec, where: str) -> Record:
    """One Alpaca record, checked: instruction a non-empty string, output a string, input a string or absent."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected an object with instruction/input/output, got {type(rec).__name__}")
    for field in ("instruction", "output"):
        if field not in rec:
            raise ValueError(f"{where}: missing the field {field!r} (fields present: {sorted(rec)})")
    out = {}
    for field in ("instruction", "input", "output"):
        value = rec.get(field)
        if field == "input" and value is None:  # absent or null: no input
            value = ""
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
        out[field] = value
    if not out["instruction"].strip():
        raise ValueError(f"{where}: field 'instruction' is empty")
    return out


def _read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text: invalid byte 0x{raw[e.start]:02x} at byte offset {e.start} "
                         f"({e.reason})") from None
    return text.removeprefix("\ufeff")  # tolerate a UTF-8 byte-order mark


def read_records(path: str, empty_output: str = "skip") -> tuple[list[Record], list[int]]:
    """Read Alpaca records from a JSON file (a list of objects) or JSON Lines (`.jsonl`, one object per line).

    Returns (records, indices of the records skipped for an empty output). Every record needs a
    non-empty string `instruction` and a string `output`; `input` is optional (absent or null: "").
    Other fields are ignored. Records whose output is empty or blank teach nothing but to stop at
    once; Stanford Alpaca's own alpaca_data.json has a few (e.g. record 284), so by default they are
    skipped and reported (`empty_output="error"` raises instead). Errors name the file, the record
    index, and for JSON syntax errors the line and column; for non-UTF-8 text, the byte offset.
    """
    if empty_output not in EMPTY_OUTPUT_RULES:
        raise ValueError(f"empty_output must be one of {EMPTY_OUTPUT_RULES}, got {empty_output!r}")
    text = _read_text(path)
    checked: list[tuple[Record, str]] = []
    if path.endswith((".jsonl", ".ndjson")):
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}: record {len(checked)} (line {lineno})"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON at column {e.colno}: {e.msg}") from None
            checked.append((_check_record(rec, where), where))
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            hint = " (one object per line? name the file .jsonl)" if e.msg == "Extra data" else ""
            raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}{hint}") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got a JSON {type(data).__name__}")
        checked = [(_check_record(rec, f"{path}: record {i}"), f"{path}: record {i}") for i, rec in enumerate(data)]
    if not checked:
        raise ValueError(f"{path}: contains no records")
    records, skipped = [], []
    for i, (rec, where) in enumerate(checked):
        if rec["output"].strip():
            records.append(rec)
        elif empty_output == "error":
            raise ValueError(f"{where}: field 'output' is empty")
        else:
            skipped.append(i)
    if not records:
        raise ValueError(f"{path}: all {len(checked)} records have an empty output")
    return records, skipped


def load_records(path: str, empty_output: str = "skip") -> list[Record]:
    """The records of `read_records` (those with an empty output skipped, or an error)."""
    return read_records(path, empty_output)[0]


def split_train_val(records: Sequence[Record], val_frac: float, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """Hold out round(val_frac * n) records (at least 1 when val_frac > 0), chosen at random by `seed`.

    Both parts keep the original order. val_frac = 0 gives (all records, []).
    """
    if not 0.0 <= val_frac < 1.0:
        raise ValueError(f"val_frac must be in [0, 1), got {val_frac}")
    n = len(records)
    n_val = max(1, round(n * val_frac)) if val_frac > 0 else 0
    if n_val >= n:
        raise ValueError(f"val_frac={val_frac} of {n} records leaves no training records")
    held = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


# ----------------------------------------------------------------------------------------------
# Tokenizing: [BOS] prompt response [EOS], the prompt masked out of the loss
# ----------------------------------------------------------------------------------------------

OVERFLOW_RULES = ("truncate", "drop")


@dataclass
class Tokenized:
    """One example. `prompt_cut` / `response_cut`: how many tokens truncation removed from each."""
    input_ids: list[int]
    labels: list[int]
    prompt_cut: int = 0
    response_cut: int = 0


def build_example(bos_id: int, prompt_ids: list[int], response_ids: list[int], eos_id: int,
                  max_len: int = 512, on_overflow: str = "truncate") -> Optional[Tokenized]:
    """Assemble input_ids and labels from separately tokenized parts; None if the example is dropped.

        input_ids = [BOS] + prompt_ids + response_ids + [EOS]
        labels    = [-100] * (1 + len(prompt_ids)) + response_ids + [EOS]

    The labels are built from the parts themselves, never by assuming that tokenizing the prompt
    alone gives a prefix of tokenizing the whole text (with sentencepiece it often does not).

    When the example is longer than max_len, `on_overflow="drop"` drops it; `"truncate"` keeps as
    many response tokens as possible:
      1. cut the prompt from the left (its start, the generic "Below is an instruction..." text,
         goes first; its end "### Response:" stays next to the answer); BOS is always kept;
      2. if the response alone (with BOS and EOS) is still too long, cut the response's tail and
         drop EOS as well: the cut response does not end there, and an EOS would teach the model
         to stop in the middle of an answer.
    An example with no target token left is dropped (None); with max_len >= 2 this cannot happen.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2 (BOS and one target token), got {max_len}")
    if on_overflow not in OVERFLOW_RULES:
        raise ValueError(f"on_overflow must be one of {OVERFLOW_RULES}, got {on_overflow!r}")
    prompt, response, eos = list(prompt_ids), list(response_ids), [eos_id]
    excess = 1 + len(prompt) + len(response) + 1 - max_len
    prompt_cut = response_cut = 0
    if excess > 0:
        if on_overflow == "drop":
            return None
        prompt_cut = min(excess, len(prompt))
        prompt = prompt[prompt_cut:]
        excess -= prompt_cut
        if excess > 0:  # BOS + the whole response + EOS do not fit: keep BOS + the response's head
            eos = []
            response_cut = len(response) - (max_len - 1)
            response = response[: max_len - 1]
    targets = response + eos
    if not targets:
        return None
    return Tokenized([bos_id] + prompt + targets, [IGNORE_INDEX] * (1 + len(prompt)) + targets,
                     prompt_cut, response_cut)


def tokenize_example(tokenizer: Tokenizer, record: Record, max_len: int = 512,
                     on_overflow: str = "truncate") -> Optional[Tokenized]:
    """`build_example` for one Alpaca record: prompt = format_prompt(instruction, input).

    The response is tokenized on its own, so sentencepiece's dummy prefix gives its first word a
    leading "▁" (the text is effectively prompt + " " + output): the same tokens the model produces
    when it answers a prompt that ends in "### Response:" at generation time.
    """
    prompt = format_prompt(record["instruction"], record.get("input", ""))
    return build_example(tokenizer.bos_id, tokenizer.encode(prompt), tokenizer.encode(record["output"]),
                         tokenizer.eos_id, max_len, on_overflow)


class SupervisedDataset(torch.utils.data.Dataset):
    """Tokenized Alpaca examples (Stanford Alpaca's name): item i is dict(input_ids, labels), 1-D long.

    `records` are the records kept (aligned with the examples); `stats` counts what tokenization
    did: records, examples, prompt_truncated, response_truncated, dropped, tokens, target_tokens.
    Raises if records were given and every one was dropped.
    """

    def __init__(self, records: Sequence[Record], tokenizer: Tokenizer, max_len: int = 512,
                 on_overflow: str = "truncate", source: str = "records"):
        self.max_len, self.pad_id, self.source = max_len, tokenizer.eos_id, source
        prompts = tokenizer.encode_batch([format_prompt(r["instruction"], r.get("input", "")) for r in records])
        responses = tokenizer.encode_batch([r["output"] for r in records])
        self.records: list[Record] = []
        self.input_ids: list[torch.Tensor] = []  # int32 to halve memory; items come out as int64
        self.labels: list[torch.Tensor] = []
        stats = dict(records=len(records), examples=0, prompt_truncated=0, response_truncated=0, dropped=0,
                     tokens=0, target_tokens=0)
        for rec, p, r in zip(records, prompts, responses):
            ex = build_example(tokenizer.bos_id, p, r, tokenizer.eos_id, max_len, on_overflow)
            if ex is None:
                stats["dropped"] += 1
                continue
            stats["prompt_truncated"] += ex.prompt_cut > 0
            stats["response_truncated"] += ex.response_cut > 0
            stats["tokens"] += len(ex.input_ids)
            stats["target_tokens"] += sum(1 for y in ex.labels if y != IGNORE_INDEX)
            self.records.append(rec)
            self.input_ids.append(torch.tensor(ex.input_ids, dtype=torch.int32))
            self.labels.append(torch.tensor(ex.labels, dtype=torch.int32))
        stats["examples"] = len(self.input_ids)
        self.stats = stats
        if records and not self.input_ids:
            raise ValueError(f"{source}: all {len(records)} examples were filtered out "
                             f"(max_len={max_len}, on_overflow={on_overflow!r})")

    @classmethod
    def from_file(cls, path: str, tokenizer: Tokenizer, max_len: int = 512, on_overflow: str = "truncate"):
        return cls(load_records(path), tokenizer, max_len, on_overflow, source=path)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return dict(input_ids=self.input_ids[i].long(), labels=self.labels[i].long())

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.input_ids]

    def describe(self) -> str:
        s = self.stats
        return (f"{self.source}: {s['examples']} examples from {s['records']} records, {s['tokens']:,} tokens "
                f"({s['target_tokens']:,} supervised); max_len {self.max_len}: {s['prompt_truncated']} prompts "
                f"truncated, {s['response_truncated']} responses truncated, {s['dropped']} dropped")


def build_datasets(train_path: str, tokenizer: Tokenizer, *, val_path: Optional[str] = None,
                   val_frac: float = 0.0, max_len: int = 512, seed: int = 0,
                   on_overflow: str = "truncate") -> tuple[SupervisedDataset, SupervisedDataset, str]:
    """(train set, held-out set, a printable report). The held-out set is `val_path` if given, else
    `split_train_val(records of train_path, val_frac, seed)`; it may be empty (val_frac = 0)."""
    records, skipped = read_records(train_path)
    notes = [f"{train_path}: skipped {len(skipped)} record(s) with an empty output: {skipped[:10]}"] if skipped else []
    if val_path is not None:
        val_recs, val_skipped = read_records(val_path)
        if val_skipped:
            notes.append(f"{val_path}: skipped {len(val_skipped)} record(s) with an empty output: {val_skipped[:10]}")
        train_recs, val_source = records, val_path
    else:
        train_recs, val_recs = split_train_val(records, val_frac, seed)
        val_source = f"{train_path} (held out {val_frac:g})"
    train = SupervisedDataset(train_recs, tokenizer, max_len, on_overflow, source=train_path)
    val = SupervisedDataset(val_recs, tokenizer, max_len, on_overflow, source=val_source)
    report = "\n".join(notes + ["train: " + train.describe(), "val:   " + val.describe()])
    return train, val, report


def val_records(dataset: SupervisedDataset) -> list[Record]:
    """The records behind a dataset's examples (e.g. to show held-out answers)."""
    return dataset.records


# ----------------------------------------------------------------------------------------------
# Batching with right padding
# ----------------------------------------------------------------------------------------------

def _pad_right(seqs: list[torch.Tensor], value: int, width: int) -> torch.Tensor:
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


@dataclass
class DataCollatorForSupervisedDataset:
    """Right-pad a list of examples to the longest: dict(input_ids, labels, attention_mask), (B, T).

    Padding uses `pad_id` (EOS by default, the dataset's pad_id: LLaMA has no pad token, and any existing id will do)
    with labels IGNORE_INDEX, so padding is never a target. Right padding needs no attention mask in
    a causal model: a real token at position t attends only to positions <= t, which are all real,
    so its hidden state and logits are exactly those of the unpadded example (and RoPE positions
    0..len-1 are unchanged). The padding positions do compute, but their outputs are never scored.
    `attention_mask` (True on real tokens) is returned for counting and for other models.
    """
    pad_id: int

    def __call__(self, instances: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not instances:
            raise ValueError("cannot collate an empty batch")
        ids = [x["input_ids"] for x in instances]
        width = max(len(s) for s in ids)
        lengths = torch.tensor([len(s) for s in ids])
        return dict(input_ids=_pad_right(ids, self.pad_id, width),
                    labels=_pad_right([x["labels"] for x in instances], IGNORE_INDEX, width),
                    attention_mask=torch.arange(width)[None, :] < lengths[:, None])


def _rng(seed: int, epoch: int) -> np.random.Generator:
    """A generator that is a pure function of (seed, epoch) (numpy's SeedSequence mixes both)."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got {seed}, {epoch}")
    return np.random.default_rng([seed, epoch])


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                           mega_batch_mult: int = 50, drop_last: bool = False) -> list[list[int]]:
    """Batches of example indices of similar length (Hugging Face's group_by_length), shuffled.

    Shuffle all indices; cut them into mega-batches of batch_size * mega_batch_mult; sort each
    mega-batch by length (longest first) and split it into batches; shuffle the batch order; put
    the batch holding the longest example first (so running out of memory happens at step 1, not
    hours in). Less padding than random batches, still random at the scale of mega-batches.
    A pure function of (lengths, batch_size, seed, epoch): a resumed run recomputes the same order.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rng = _rng(seed, epoch)
    perm = rng.permutation(len(lengths)).tolist()
    mega = batch_size * max(1, mega_batch_mult)
    batches = []
    for start in range(0, len(perm), mega):
        chunk = sorted(perm[start:start + mega], key=lambda i: -lengths[i])  # stable: ties keep shuffled order
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    if drop_last:
        batches = [b for b in batches if len(b) == batch_size]
    order = rng.permutation(len(batches)).tolist()
    batches = [batches[k] for k in order]
    if batches:
        longest = max(range(len(batches)), key=lambda k: max(lengths[i] for i in batches[k]))
        batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def random_batches(n: int, batch_size: int, seed: int, epoch: int, drop_last: bool = False) -> list[list[int]]:
    """Plain shuffled batches of example indices, a pure function of (n, batch_size, seed, epoch)."""
    perm = _rng(seed, epoch).permutation(n).tolist()
    batches = [perm[j:j + batch_size] for j in range(0, n, batch_size)]
    return [b for b in batches if len(b) == batch_size] if drop_last else batches


def pad_batch(batch: dict[str, torch.Tensor], width: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a collated batch's (B, T) tensors to (B, width), width >= T, as the collators pad:
    input_ids pad_id (any id), labels IGNORE_INDEX (never a target), attention_mask False, and for
    packed rows the new columns form a document of their own (doc_ids one more than the row's
    largest, input_pos from 0), which no real token attends to. Used to give a CUDA graph the
    fixed shapes it replays (graph_step.py)."""
    T = batch["input_ids"].shape[1]
    if width < T:
        raise ValueError(f"cannot pad a batch of width {T} to {width}")
    extra = width - T
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": False}
    out = {}
    for k, v in batch.items():
        if k == "doc_ids":
            tail = (v.max(dim=1, keepdim=True).values + 1).expand(-1, extra)
        elif k == "input_pos":
            tail = torch.arange(extra, dtype=v.dtype).expand(v.shape[0], -1)
        elif k in fill:
            tail = torch.full((v.shape[0], extra), fill[k], dtype=v.dtype)
        else:
            raise KeyError(f"pad_batch: no padding rule for {k!r}")
        out[k] = torch.cat([v, tail.to(v.device)], dim=1)
    return out


# ----------------------------------------------------------------------------------------------
# Packing: several examples per row, each attending only to itself
# ----------------------------------------------------------------------------------------------

def pack_rows(lengths: Sequence[int], max_len: int, seed: int = 0) -> list[list[int]]:
    """Group example indices into rows of at most max_len tokens (best fit, over a shuffled order).

    Examples are taken in an order shuffled by `seed`; each goes into the open row with the least
    room that still fits it, or starts a new row. Best fit wastes a few percent of each row, where
    filling rows one after the other wastes about half an example per row.
    """
    too_long = [i for i, n in enumerate(lengths) if n > max_len]
    if too_long:
        raise ValueError(f"{len(too_long)} example(s) are longer than the row length {max_len} "
                         f"(example {too_long[0]} has {lengths[too_long[0]]} tokens)")
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row index), sorted: the best fit is a bisection away
    for i in np.random.default_rng(seed).permutation(len(lengths)).tolist():
        k = bisect.bisect_left(room, (lengths[i], -1))
        if k < len(room):
            free, r = room.pop(k)
        else:
            free, r = max_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if free - lengths[i] > 0:
            bisect.insort(room, (free - lengths[i], r))
    return rows


def collate_packed(rows: Sequence[Sequence[dict]], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate each row's examples; pad rows on the right to the longest row of the batch.

    Returns (B, T) tensors: input_ids, labels, attention_mask (True on real tokens),
    input_pos (positions restarting at 0 for each example, so RoPE sees each example as if alone),
    doc_ids (0, 1, ... for the examples of a row; the padding tail gets the next id, so it is a
    document of its own that no real token attends to).

    Document boundaries: the loss scores the logits at t against labels[t + 1]. At a boundary,
    labels[t + 1] is the next example's BOS, which is always IGNORE_INDEX (BOS is part of the
    masked prompt), so no example is ever trained to predict the next one's start.
    """
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("cannot collate an empty batch or an empty row")
    width = max(sum(len(x["input_ids"]) for x in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    input_pos = torch.zeros((B, width), dtype=torch.long)
    doc_ids = torch.zeros((B, width), dtype=torch.long)
    attention_mask = torch.zeros((B, width), dtype=torch.bool)
    for b, row in enumerate(rows):
        t = 0
        for d, x in enumerate(row):
            n = len(x["input_ids"])
            input_ids[b, t:t + n] = x["input_ids"]
            labels[b, t:t + n] = x["labels"]
            input_pos[b, t:t + n] = torch.arange(n)
            doc_ids[b, t:t + n] = d
            t += n
        attention_mask[b, :t] = True
        input_pos[b, t:] = torch.arange(width - t)
        doc_ids[b, t:] = len(row)
    return dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask, input_pos=input_pos,
                doc_ids=doc_ids)


# ----------------------------------------------------------------------------------------------
# The batch plan train.py iterates
# ----------------------------------------------------------------------------------------------

class Batches(Sequence):
    """An epoch's batches, collated on access: len(), batches[k], batches[k:], iteration.

    `plan[k]` is batch k as a list of rows, each row a list of example indices (one example per
    row unless packed). Indexing lets a resumed run start at batch k without collating the rest.
    """

    def __init__(self, dataset: SupervisedDataset, plan: list[list[list[int]]], pad_id: int, packed: bool):
        self.dataset, self.plan, self.pad_id, self.packed = dataset, plan, pad_id, packed
        self._collator = DataCollatorForSupervisedDataset(pad_id)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: Union[int, slice]):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        rows = [[self.dataset[i] for i in row] for row in self.plan[k]]
        if self.packed:
            return collate_packed(rows, self.pad_id)
        return self._collator([row[0] for row in rows])


def make_batches(dataset: SupervisedDataset, batch_size: int, max_len: Optional[int] = None, *,
                 pack: bool = False, seed: int = 0, epoch: int = 0, pad_id: Optional[int] = None,
                 group_by_length: bool = True, drop_last: bool = False) -> Batches:
    """One epoch's batches, a pure function of (dataset, batch_size, max_len, pack, seed, epoch).

    Padded (pack=False): batch_size examples per batch, length-grouped (or plainly shuffled when
    group_by_length=False), right-padded to the batch's longest: dict(input_ids, labels,
    attention_mask). Packed: examples packed into rows of at most max_len (default:
    dataset.max_len) tokens by `pack_rows` with `seed` (the same rows every epoch, so every epoch has
    the same number of batches), rows shuffled by (seed, epoch), batch_size rows per batch:
    dict(input_ids, labels, attention_mask, input_pos, doc_ids), to be passed to the model as
    model(input_ids, input_pos=input_pos, doc_ids=doc_ids).
    pad_id defaults to dataset.pad_id (EOS). Resume at batch k with `make_batches(...)[k:]`.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    pad_id = dataset.pad_id if pad_id is None else pad_id
    lengths = dataset.lengths
    if pack:
        rows = pack_rows(lengths, max_len or dataset.max_len, seed)
        plan = [[rows[r] for r in batch] for batch in random_batches(len(rows), batch_size, seed, epoch, drop_last)]
    else:
        idx = (length_grouped_batches(lengths, batch_size, seed, epoch, drop_last=drop_last) if group_by_length
               else random_batches(len(lengths), batch_size, seed, epoch, drop_last))
        plan = [[[i] for i in batch] for batch in idx]
    return Batches(dataset, plan, pad_id, packed=pack)


def shard_batch(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's share of a global batch (rows split as evenly as possible), trimmed to its own
    longest row: the share of each of `world` data-parallel processes."""
    if world == 1:
        return batch
    B = batch["input_ids"].shape[0]
    if B < world:
        raise ValueError(f"a batch of {B} rows cannot be split over {world} processes (use drop_last=True)")
    rows = torch.tensor_split(torch.arange(B), world)[rank]
    width = int(batch["attention_mask"][rows].sum(1).max())
    return {k: v[rows, :width] for k, v in batch.items()}
