"""data.py: Alpaca reading, masked-prompt labels, truncation, batching and packing.

References: tests/data/prompt_templates.json (Stanford Alpaca's PROMPT_DICT),
tests/data/llama2_tokenizer_reference.json (sentencepiece encodings of the LLaMA-2 tokenizer),
hand-built expected id lists, and model.py's forward on each example alone (for packing/padding).
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F

import data
from data import IGNORE_INDEX, PROMPT_DICT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_TOK = os.path.join(ROOT, "models", "llama2-tokenizer", "tokenizer.model")
TINY = os.path.join(ROOT, "models", "stories260K")
SAMPLE = os.path.join(ROOT, "data", "alpaca_sample.json")
TOK_REF = json.load(open(os.path.join(ROOT, "tests", "data", "llama2_tokenizer_reference.json")))
BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def tok():
    return data.Tokenizer(LLAMA_TOK)


def ref_ids(text):
    """The stored sentencepiece encoding of `text` from the reference file."""
    for case in TOK_REF["cases"]:
        if case["text"] == text:
            return case["ids"]
    raise KeyError(text)


# ---------------------------------------------------------------------------------------------
# Prompts and labels
# ---------------------------------------------------------------------------------------------

def test_prompt_templates_are_stanford_alpacas():
    with open(os.path.join(ROOT, "tests", "data", "prompt_templates.json")) as f:
        assert PROMPT_DICT == json.load(f)


def test_format_prompt_picks_template_by_input():
    assert data.format_prompt("Do X.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nDo X.\n\n### Response:")
    assert data.format_prompt("Do X.", "on Y") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nDo X.\n\n"
        "### Input:\non Y\n\n### Response:")


def _check_hand_built(tok, record, prompt_text):
    ex = data.tokenize_example(tok, record)
    # Expected ids built from separately encoded pieces; the response ids come from the stored
    # sentencepiece reference, not from our encode.
    prompt_ids = tok.sp.encode(prompt_text)
    response_ids = ref_ids(record["output"])
    assert ex.input_ids == [BOS] + prompt_ids + response_ids + [EOS]
    assert ex.labels == [IGNORE_INDEX] * (1 + len(prompt_ids)) + response_ids + [EOS]
    n_masked = 1 + len(prompt_ids)
    # The last masked token ends "### Response:"; the first supervised token starts the answer.
    assert tok.id_to_piece(ex.input_ids[n_masked - 1]) == ":"
    assert tok.decode(ex.input_ids[1:n_masked]) == prompt_text
    sup = [y for y in ex.labels if y != IGNORE_INDEX]
    assert sup[-1] == EOS and ex.input_ids[-1] == EOS
    assert tok.decode(sup[:-1]) == record["output"]
    assert (ex.prompt_cut, ex.response_cut) == (0, 0)
    return ex, prompt_ids


def test_labels_hand_checked_without_input(tok):
    rec = {"instruction": "Give three tips for staying healthy.", "input": "",
           "output": "Once upon a time, there was a little girl named Lily."}
    prompt = ("Below is an instruction that describes a task. Write a response that appropriately "
              "completes the request.\n\n### Instruction:\nGive three tips for staying healthy.\n\n### Response:")
    ex, p = _check_hand_built(tok, rec, prompt)
    assert ref_ids(rec["output"])[:3] == [9038, 2501, 263]  # "▁Once ▁upon ▁a": the answer's first labels
    assert ex.labels[1 + len(p):1 + len(p) + 3] == [9038, 2501, 263]


def test_labels_hand_checked_with_input(tok):
    rec = {"instruction": "Translate to French.", "input": "Hello world", "output": "Hello world"}
    prompt = ("Below is an instruction that describes a task, paired with an input that provides further "
              "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
              "Translate to French.\n\n### Input:\nHello world\n\n### Response:")
    ex, p = _check_hand_built(tok, rec, prompt)
    assert ex.input_ids[-3:] == [15043, 3186, EOS]  # "▁Hello ▁world </s>" from the stored reference
    assert ex.labels[-3:] == [15043, 3186, EOS]
    assert ex.labels[: 1 + len(p)] == [IGNORE_INDEX] * (1 + len(p))
    # a missing input means the same as an empty one
    assert data.tokenize_example(tok, {"instruction": "x", "output": "y"}) == \
        data.tokenize_example(tok, {"instruction": "x", "input": "", "output": "y"})


def test_every_bundled_example_masks_exactly_its_prompt(tok):
    ds = data.SupervisedDataset(data.load_records(SAMPLE), tok, max_len=4096)
    assert len(ds) == 963  # 964 records, one with an empty output skipped
    for rec, ids, labels in zip(ds.records, ds.input_ids, ds.labels):
        ids, labels = ids.tolist(), labels.tolist()
        n_prompt = len(tok.encode(data.format_prompt(rec["instruction"], rec["input"])))
        assert ids[0] == BOS and ids[-1] == EOS and labels[-1] == EOS
        assert labels[: 1 + n_prompt] == [IGNORE_INDEX] * (1 + n_prompt)
        assert labels[1 + n_prompt:] == ids[1 + n_prompt:]  # every response token and EOS is a target
        assert tok.decode(labels[1 + n_prompt:-1]) == rec["output"]
    assert ds.stats["target_tokens"] == sum(int((lab != IGNORE_INDEX).sum()) for lab in ds.labels)


# ---------------------------------------------------------------------------------------------
# Truncation
# ---------------------------------------------------------------------------------------------

P = [10, 11, 12, 13, 14]  # prompt ids
R = [20, 21, 22]           # response ids
M = IGNORE_INDEX


def test_no_truncation_when_it_fits():
    ex = data.build_example(BOS, P, R, EOS, max_len=10)  # 1 + 5 + 3 + 1 = 10
    assert ex.input_ids == [BOS] + P + R + [EOS]
    assert ex.labels == [M] * 6 + R + [EOS]


def test_prompt_is_cut_from_the_left_first():
    ex = data.build_example(BOS, P, R, EOS, max_len=8)  # 2 too many: drop prompt 10, 11
    assert ex.input_ids == [BOS, 12, 13, 14] + R + [EOS]
    assert ex.labels == [M, M, M, M] + R + [EOS]
    assert (ex.prompt_cut, ex.response_cut) == (2, 0)
    ex = data.build_example(BOS, P, R, EOS, max_len=5)  # whole prompt goes, response intact
    assert ex.input_ids == [BOS] + R + [EOS] and ex.labels == [M] + R + [EOS]
    assert (ex.prompt_cut, ex.response_cut) == (5, 0)


def test_then_the_response_tail_is_cut_and_eos_dropped():
    ex = data.build_example(BOS, P, R, EOS, max_len=3)
    assert ex.input_ids == [BOS, 20, 21] and ex.labels == [M, 20, 21]
    assert (ex.prompt_cut, ex.response_cut) == (5, 1)
    ex = data.build_example(BOS, P, R, EOS, max_len=4)  # BOS + R fits, EOS does not
    assert ex.input_ids == [BOS] + R and ex.labels == [M] + R
    ex = data.build_example(BOS, P, R, EOS, max_len=2)
    assert ex.input_ids == [BOS, 20] and ex.labels == [M, 20]


def test_drop_rule_and_bad_max_len():
    assert data.build_example(BOS, P, R, EOS, max_len=9, on_overflow="drop") is None
    assert data.build_example(BOS, P, R, EOS, max_len=10, on_overflow="drop").input_ids[-1] == EOS
    assert data.build_example(BOS, P, [], EOS, max_len=7).labels == [M] * 6 + [EOS]  # only EOS to learn
    with pytest.raises(ValueError, match="at least 2"):
        data.build_example(BOS, P, R, EOS, max_len=1)
    with pytest.raises(ValueError, match="on_overflow"):
        data.build_example(BOS, P, R, EOS, max_len=8, on_overflow="left")


def test_truncation_keeps_the_whole_response_with_real_tokenizer(tok):
    rec = {"instruction": "Summarize the text below in one sentence. " * 20, "input": "",
           "output": "Once upon a time, there was a little girl named Lily."}
    target = ref_ids(rec["output"]) + [EOS]  # 15 tokens
    ex = data.tokenize_example(tok, rec, max_len=40)
    assert len(ex.input_ids) == 40 and ex.input_ids[0] == BOS
    assert ex.input_ids[-15:] == target
    assert tok.decode(ex.input_ids[1:-15]).endswith("### Response:")  # the prompt's end survives
    assert ex.labels == [M] * 25 + target
    assert ex.prompt_cut == len(tok.encode(data.format_prompt(rec["instruction"]))) - 24


def test_dataset_counts_truncation_and_drops(tok):
    recs = [{"instruction": "Hi", "output": "Hello world"},
            {"instruction": "Long " * 100, "output": "Hello world"},
            {"instruction": "Hi", "output": "word " * 100}]
    ds = data.SupervisedDataset(recs, tok, max_len=48)
    assert ds.stats == dict(records=3, examples=3, prompt_truncated=2, response_truncated=1, dropped=0,
                            tokens=sum(ds.lengths), target_tokens=ds.stats["target_tokens"])
    assert max(ds.lengths) == 48
    dropped = data.SupervisedDataset(recs, tok, max_len=48, on_overflow="drop")
    assert dropped.stats["dropped"] == 2 and dropped.records == recs[:1]
    with pytest.raises(ValueError, match="all 2 examples were filtered out"):
        data.SupervisedDataset(recs[1:], tok, max_len=48, on_overflow="drop", source="f.json")
    assert "1 responses truncated" in ds.describe()


# ---------------------------------------------------------------------------------------------
# Reading records: clear errors
# ---------------------------------------------------------------------------------------------

def write(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(p)


def test_reads_json_and_jsonl(tmp_path):
    recs = [{"instruction": "a", "input": "b", "output": "c", "extra": 1}, {"instruction": "d", "output": "e"},
            {"instruction": "f", "input": None, "output": "g"}]
    expect = [{"instruction": "a", "input": "b", "output": "c"}, {"instruction": "d", "input": "", "output": "e"},
              {"instruction": "f", "input": "", "output": "g"}]
    assert data.load_records(write(tmp_path, "a.json", json.dumps(recs))) == expect
    lines = "\n".join(json.dumps(r) for r in recs) + "\n\n"
    assert data.load_records(write(tmp_path, "a.jsonl", lines)) == expect
    assert data.load_records(write(tmp_path, "bom.json", b"\xef\xbb\xbf" + json.dumps(recs).encode())) == expect


@pytest.mark.parametrize("name,content,match", [
    ("bad.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]',
     r"bad.json: invalid JSON at line 2 column 22: Expecting ',' delimiter"),
    ("obj.json", '{"instruction": "a", "output": "b"}', r"expected a JSON list of records, got a JSON dict"),
    ("lines.json", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"}', r"name the file \.jsonl"),
    ("noinst.json", '[{"instruction": "a", "output": "b"}, {"output": "b"}]', r"record 1: missing the field 'instruction'"),
    ("noout.json", '[{"instruction": "a", "input": "x"}]', r"record 0: missing the field 'output'"),
    ("num.json", '[{"instruction": "a", "output": "b"}, {"instruction": "a", "output": 3}]',
     r"record 1: field 'output' must be a string, got int"),
    ("listin.json", '[{"instruction": "a", "input": ["x"], "output": "b"}]', r"record 0: field 'input' must be a string"),
    ("noobj.json", '[["a", "b"]]', r"record 0: expected an object"),
    ("emptyinst.json", '[{"instruction": " ", "output": "b"}]', r"record 0: field 'instruction' is empty"),
    ("empty.json", "[]", r"contains no records"),
    ("allempty.json", '[{"instruction": "a", "output": ""}]', r"all 1 records have an empty output"),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "a", output}\n',
     r"bad.jsonl: record 1 \(line 3\): invalid JSON at column 22"),
    ("inst.jsonl", '{"instruction": "a", "output": "b"}\n{"output": "b"}\n', r"record 1 \(line 2\): missing the field"),
    ("latin1.json", '[{"instruction": "caf'.encode() + b"\xe9" + b'", "output": "b"}]',
     r"not UTF-8 text: invalid byte 0xe9 at byte offset 21"),
])
def test_bad_files_name_the_problem(tmp_path, name, content, match):
    path = write(tmp_path, name, content)
    with pytest.raises(ValueError, match=match) as e:
        data.load_records(path)
    assert name in str(e.value)


def test_missing_file_and_empty_outputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.json"):
        data.load_records(str(tmp_path / "nope.json"))
    path = write(tmp_path, "e.json", json.dumps([{"instruction": "a", "output": "b"},
                                                 {"instruction": "a", "output": "  \n"}]))
    records, skipped = data.read_records(path)
    assert records == [{"instruction": "a", "input": "", "output": "b"}] and skipped == [1]
    with pytest.raises(ValueError, match=r"e.json: record 1: field 'output' is empty"):
        data.load_records(path, empty_output="error")
    _, _, report = data.build_datasets(path, data.Tokenizer(LLAMA_TOK))
    assert "skipped 1 record(s) with an empty output: [1]" in report


def test_bundled_sample_loads(tmp_path):
    records, skipped = data.read_records(SAMPLE)
    assert len(records) == 963 and skipped == [284]  # Alpaca's record 284 has an empty output


# ---------------------------------------------------------------------------------------------
# Held-out split
# ---------------------------------------------------------------------------------------------

def test_split_train_val():
    recs = [{"instruction": str(i), "input": "", "output": "o"} for i in range(100)]
    tr, va = data.split_train_val(recs, 0.1, seed=3)
    assert len(va) == 10 and len(tr) == 90
    assert sorted(tr + va, key=lambda r: int(r["instruction"])) == recs
    assert tr == sorted(tr, key=lambda r: int(r["instruction"]))  # original order kept
    assert data.split_train_val(recs, 0.1, seed=3) == (tr, va)
    assert data.split_train_val(recs, 0.1, seed=4)[1] != va
    assert data.split_train_val(recs, 0.0) == (recs, [])
    assert len(data.split_train_val(recs, 0.001)[1]) == 1  # at least one held out
    with pytest.raises(ValueError, match="val_frac"):
        data.split_train_val(recs, 1.0)
    with pytest.raises(ValueError, match="leaves no training records"):
        data.split_train_val(recs[:1], 0.5)


def test_build_datasets_with_separate_val_file(tmp_path, tok):
    train_path = write(tmp_path, "t.json", json.dumps([{"instruction": f"i{i}", "output": "o"} for i in range(5)]))
    val_path = write(tmp_path, "v.jsonl", json.dumps({"instruction": "v", "output": "w"}) + "\n")
    tr, va, report = data.build_datasets(train_path, tok, val_path=val_path, max_len=64)
    assert len(tr) == 5 and len(va) == 1 and data.val_records(va)[0]["instruction"] == "v"
    assert "train: " in report and "val:" in report
    tr, va, _ = data.build_datasets(train_path, tok, val_frac=0.4, seed=0)
    assert len(tr) == 3 and len(va) == 2


# ---------------------------------------------------------------------------------------------
# Batching: padding, length grouping, packing, the epoch plan
# ---------------------------------------------------------------------------------------------

def test_collator_right_pads_with_masked_labels():
    xs = [dict(input_ids=torch.tensor([1, 5, 6]), labels=torch.tensor([M, 6, 2])),
          dict(input_ids=torch.tensor([1, 7]), labels=torch.tensor([M, 2]))]
    b = data.DataCollatorForSupervisedDataset(pad_id=2)(xs)
    assert b["input_ids"].tolist() == [[1, 5, 6], [1, 7, 2]]
    assert b["labels"].tolist() == [[M, 6, 2], [M, 2, M]]
    assert b["attention_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert b["input_ids"].dtype == b["labels"].dtype == torch.long


def test_length_grouped_batches_deterministic_and_grouped():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 500, (1000,), generator=g).tolist()
    b = data.length_grouped_batches(lengths, 8, seed=1, epoch=0, mega_batch_mult=10)
    assert sorted(i for batch in b for i in batch) == list(range(1000))
    assert b == data.length_grouped_batches(lengths, 8, seed=1, epoch=0, mega_batch_mult=10)
    assert b != data.length_grouped_batches(lengths, 8, seed=1, epoch=1, mega_batch_mult=10)
    assert b != data.length_grouped_batches(lengths, 8, seed=2, epoch=0, mega_batch_mult=10)
    assert max(lengths[i] for i in b[0]) == max(lengths)  # longest batch first
    assert all(len(x) == 8 for x in b)  # 1000 = 125 x 8

    def padded_tokens(batches):
        return sum(len(x) * max(lengths[i] for i in x) for x in batches)
    rand = data.random_batches(1000, 8, seed=1, epoch=0)
    assert padded_tokens(b) < 0.75 * padded_tokens(rand)
    dropped = data.length_grouped_batches(lengths[:999], 8, seed=1, epoch=0, drop_last=True)
    assert len(dropped) == 124 and all(len(x) == 8 for x in dropped)


def test_pack_rows_fit_and_cover():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (300,), generator=g).tolist()
    rows = data.pack_rows(lengths, 256, seed=0)
    assert sorted(i for r in rows for i in r) == list(range(300))
    assert all(sum(lengths[i] for i in r) <= 256 for r in rows)
    assert rows == data.pack_rows(lengths, 256, seed=0)
    assert sum(lengths) / (256 * len(rows)) > 0.9  # best fit wastes little
    with pytest.raises(ValueError, match="longer than the row length 100"):
        data.pack_rows([50, 101], 100)


def test_collate_packed_positions_docs_and_boundaries(tok):
    recs = data.load_records(SAMPLE)[:12]
    ds = data.SupervisedDataset(recs, tok, max_len=256)
    batches = data.make_batches(ds, 2, 512, pack=True, seed=0, epoch=0)
    seen = []
    for k in range(len(batches)):
        b, rows = batches[k], batches.plan[k]
        for r, row in enumerate(rows):
            t = 0
            for d, i in enumerate(row):
                n = len(ds.input_ids[i])
                assert b["input_ids"][r, t:t + n].tolist() == ds.input_ids[i].tolist()
                assert b["labels"][r, t:t + n].tolist() == ds.labels[i].tolist()
                assert b["input_pos"][r, t:t + n].tolist() == list(range(n))
                assert (b["doc_ids"][r, t:t + n] == d).all()
                # the token at a boundary is the next example's BOS, never a target
                assert b["input_ids"][r, t] == BOS and b["labels"][r, t] == IGNORE_INDEX
                t += n
                seen.append(i)
            assert b["attention_mask"][r].sum() == t
            assert (b["labels"][r, t:] == IGNORE_INDEX).all() and (b["doc_ids"][r, t:] == len(row)).all()
            assert b["input_pos"][r, t:].tolist() == list(range(b["input_ids"].shape[1] - t))
        assert b["input_ids"].shape[1] == max(int(b["attention_mask"][r].sum()) for r in range(len(rows)))
    assert sorted(seen) == list(range(len(ds)))


@pytest.mark.parametrize("pack", [False, True])
def test_make_batches_pure_and_resumable(tok, pack):
    ds = data.SupervisedDataset(data.load_records(SAMPLE)[:60], tok, max_len=256)
    a = data.make_batches(ds, 4, pack=pack, seed=7, epoch=2)
    b = data.make_batches(ds, 4, pack=pack, seed=7, epoch=2)
    assert a.plan == b.plan and a.plan != data.make_batches(ds, 4, pack=pack, seed=7, epoch=3).plan
    full = list(a)
    for x, y in zip(full[3:], b[3:]):  # resume at batch 3
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert sorted(i for batch in a.plan for row in batch for i in row) == list(range(len(ds)))
    assert len(a) == len(data.make_batches(ds, 4, pack=pack, seed=7, epoch=5))  # same length every epoch
    keys = {"input_ids", "labels", "attention_mask"} | ({"input_pos", "doc_ids"} if pack else set())
    assert set(full[0]) == keys


def test_shard_batch_splits_rows():
    xs = [dict(input_ids=torch.arange(n) + 3, labels=torch.arange(n) + 3) for n in (5, 2, 4)]
    b = data.DataCollatorForSupervisedDataset(pad_id=0)(xs)
    s0, s1 = data.shard_batch(b, 0, 2), data.shard_batch(b, 1, 2)
    assert s0["input_ids"].tolist() == [[3, 4, 5, 6, 7], [3, 4, 0, 0, 0]]
    assert s1["input_ids"].tolist() == [[3, 4, 5, 6]]  # trimmed to its own longest row
    assert data.shard_batch(b, 0, 1) is b
    with pytest.raises(ValueError, match="cannot be split over 4"):
        data.shard_batch(b, 0, 4)


# ---------------------------------------------------------------------------------------------
# With the model: a packed row / a padded batch computes exactly what each example alone does
# ---------------------------------------------------------------------------------------------

def _loss_sum(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.fixture(scope="module")
def tiny_and_data():
    M_ = pytest.importorskip("model")
    model = M_.load_model(TINY)
    tiny_tok = data.Tokenizer(os.path.join(TINY, "tokenizer.model"))
    ds = data.SupervisedDataset(data.load_records(SAMPLE)[:40], tiny_tok, max_len=400)
    return model, ds


@torch.no_grad()
def test_packed_rows_equal_examples_alone(tiny_and_data):
    model, ds = tiny_and_data
    batches = data.make_batches(ds, 2, 512, pack=True, seed=0, epoch=0)
    b, plan = batches[0], batches.plan[0]
    assert max(len(r) for r in plan) >= 2  # rows really hold several examples
    logits = model(b["input_ids"], input_pos=b["input_pos"], doc_ids=b["doc_ids"])
    total_alone = 0.0
    for r, row in enumerate(plan):
        t = 0
        for i in row:
            x = ds[i]
            alone = model(x["input_ids"][None])
            n = len(x["input_ids"])
            torch.testing.assert_close(logits[r, t:t + n], alone[0], rtol=1e-5, atol=1e-4)  # float32 logits ~10: reduction order (thread count) moves them ~1e-5
            total_alone += _loss_sum(alone, x["labels"][None]).item()
            t += n
    packed = _loss_sum(logits, b["labels"]).item()
    assert packed == pytest.approx(total_alone, rel=1e-6)
    # without doc_ids/input_pos the examples would leak into each other: the check can fail
    leaky = model(b["input_ids"])
    assert not torch.allclose(leaky, logits, atol=1e-3)


@torch.no_grad()
def test_right_padding_changes_nothing(tiny_and_data):
    model, ds = tiny_and_data
    batches = data.make_batches(ds, 4, seed=0, epoch=0, group_by_length=False)
    b, plan = batches[0], batches.plan[0]
    assert len({len(ds.input_ids[row[0]]) for row in plan}) > 1  # lengths differ: there is padding
    logits = model(b["input_ids"])
    total_alone = 0.0
    for r, row in enumerate(plan):
        x = ds[row[0]]
        alone = model(x["input_ids"][None])
        torch.testing.assert_close(logits[r, : len(x["input_ids"])], alone[0], rtol=1e-5, atol=1e-4)  # float32 logits ~10: reduction order (thread count) moves them ~1e-5
        total_alone += _loss_sum(alone, x["labels"][None]).item()
    assert _loss_sum(logits, b["labels"]).item() == pytest.approx(total_alone, rel=1e-6)
