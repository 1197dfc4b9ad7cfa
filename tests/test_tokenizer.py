"""The sentencepiece wrapper against stored sentencepiece 0.2.3 encodings of the LLaMA-2 tokenizer."""

import json
import os

import pytest

from data import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = json.load(open(os.path.join(ROOT, "tests", "data", "llama2_tokenizer_reference.json")))
CASES = REF["cases"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(os.path.join(ROOT, "models", "llama2-tokenizer", "tokenizer.model"))


def test_special_ids(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (REF["vocab_size"], REF["bos_id"], REF["eos_id"])
    for i, piece in REF["id_to_piece"].items():
        assert tok.id_to_piece(int(i)) == piece


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_encodings_match_reference(tok, case):
    assert tok.encode(case["text"]) == case["ids"]
    assert tok.encode(case["text"], bos=True) == case["ids_with_bos"]
    assert tok.encode(case["text"], bos=True, eos=True) == case["ids_with_bos"] + [REF["eos_id"]]
    assert tok.decode(case["ids"]) == case["decoded"]


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer(str(tmp_path / "tokenizer.model"))
