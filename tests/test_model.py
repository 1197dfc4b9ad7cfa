"""model.py against stored Hugging Face transformers outputs, and checkpoint round trips.

References: tests/data/stories260K_reference.json was produced by transformers' LlamaForCausalLM
(float32, CPU) on models/stories260K, and cross-checked with llama2.c's run.c.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "models", "stories260K")
REF = json.load(open(os.path.join(ROOT, "tests", "data", "stories260K_reference.json")))
PROMPTS = REF["prompts"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny():
    return M.load_model(TINY)


def greedy(model, ids, n, use_cache):
    """60 argmax tokens, either by full forward passes or through the KV cache."""
    ids = list(ids)
    if not use_cache:
        out = []
        for _ in range(n):
            with torch.no_grad():
                nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            out.append(nxt)
        return out
    from generate import generate_tokens
    return list(generate_tokens(model, ids, n, temperature=0.0, eos_id=None))


@pytest.mark.parametrize("p", PROMPTS, ids=[p["prompt"] for p in PROMPTS])
def test_logits_and_logprob_match_transformers(tiny, p):
    ids = torch.tensor([p["input_ids"]])
    with torch.no_grad():
        logits = tiny(ids)[0]
    torch.testing.assert_close(logits[-1], torch.tensor(p["last_logits"]), atol=1e-4, rtol=0)
    assert int(logits[-1].argmax()) == p["last_argmax"]
    logprobs = torch.log_softmax(logits.double(), -1)[:-1].gather(1, ids[0, 1:, None])
    assert abs(logprobs.sum().item() - p["prompt_logprob_sum"]) < 1e-3


@pytest.mark.parametrize("use_cache", [False, True], ids=["no-cache", "kv-cache"])
@pytest.mark.parametrize("p", PROMPTS, ids=[p["prompt"] for p in PROMPTS])
def test_greedy_continuation_matches_transformers(tiny, p, use_cache):
    assert greedy(tiny, p["input_ids"], 60, use_cache) == p["greedy_new_ids"]


def decode_in_turn(model, cuda_graph=True):
    """The greedy continuations of the prompts, longest first, then the others and the longest
    again, all through one Decoder whose cache starts too short for them."""
    from generate import Decoder
    order = sorted(range(len(PROMPTS)), key=lambda i: -len(PROMPTS[i]["input_ids"]))
    order.append(order[0])
    decoder = Decoder(model, max_seq_len=16, cuda_graph=cuda_graph)
    try:
        outs = [list(decoder.generate(PROMPTS[i]["input_ids"], 60)) for i in order]
        assert decoder.cache_len == 256  # grown once: 8 + 60 tokens, to a multiple of 256
    finally:
        decoder.close()
    assert model.layers[0].self_attn.kv_cache is None
    return outs, [PROMPTS[i]["greedy_new_ids"] for i in order]


def test_one_decoder_serves_many_prompts(tiny):
    """A Decoder keeps its cache between prompts; the slots past a shorter prompt still hold the
    longer one's keys and values. Each continuation must still be transformers' own."""
    outs, expected = decode_in_turn(tiny)
    assert outs == expected


def test_decoders_taking_turns_keep_their_own_caches(tiny):
    """Generators of two Decoders (and a generate_tokens call) interleaved token by token on one
    model: each still continues its prompt as transformers does. A Decoder's generator that a
    later prompt of the same Decoder overtook stops with an error instead of reading that
    prompt's cache."""
    from generate import Decoder, generate_tokens
    a, b = Decoder(tiny), Decoder(tiny)
    pa, pb, pc = PROMPTS
    ga, gb = a.generate(pa["input_ids"], 30), b.generate(pb["input_ids"], 30)
    gc = generate_tokens(tiny, pc["input_ids"], 30)
    outs = [list(t) for t in zip(*zip(ga, gb, gc))]
    assert outs == [pa["greedy_new_ids"][:30], pb["greedy_new_ids"][:30], pc["greedy_new_ids"][:30]]
    stale = a.generate(pa["input_ids"], 30)
    next(stale)
    assert list(a.generate(pb["input_ids"], 30)) == pb["greedy_new_ids"][:30]
    with pytest.raises(RuntimeError, match="began another prompt"):
        next(stale)
    assert list(b.generate(pc["input_ids"], 10)) == pc["greedy_new_ids"][:10]  # b's cache on the model
    a.close()
    assert tiny.layers[0].self_attn.kv_cache is b.caches[0]  # a's close leaves b's cache alone
    b.close()
    assert tiny.layers[0].self_attn.kv_cache is None


def test_generate_cli_prints_reference_continuation():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--prompt", "Once upon a time",
                          "--temperature", "0", "--max-new-tokens", "60", "--device", "cpu"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == PROMPTS[0]["greedy_full_text"].strip()
    assert out.stdout.endswith("\n")  # (a file that holds the output ends its last line)
    assert "60 tokens in" in out.stderr and "the first after" in out.stderr and "tokens/s" in out.stderr


def test_generate_cli_refuses_bad_sampling_and_says_when_the_context_caps_the_answer(capsys, monkeypatch):
    import generate
    for flags, says in ((["--temperature", "-1"], "--temperature must be 0 (greedy) or more"),
                        (["--top-k", "0"], "--top-k must be at least 1"),
                        (["--top-p", "0"], "--top-p must be in (0, 1]"),
                        (["--top-p", "1.5"], "--top-p must be in (0, 1]")):
        with pytest.raises(SystemExit):
            generate.parse_args(["--prompt", "Once", *flags])
        assert says in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda: torch .* (is built without CUDA|sees no GPU); use --device cpu"):
        generate.cli(["--prompt", "Once", "--device", "cuda"])
    # the bundled model's context is 512 tokens: 600 new ones after a 5-token prompt cannot all come
    generate.cli(["--prompt", "Once upon a time", "--temperature", "0", "--max-new-tokens", "600", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert "[at most 507 new tokens: the model's context is 512 tokens and the prompt takes 5]" in err, err
    assert int(re.search(r"\[(\d+) tokens in", err).group(1)) <= 507


def test_generate_chat_answers_each_line_as_alone():
    """--chat: every line is answered as --instruction answers it alone; a line too long for the
    context gets an error and the chat goes on."""
    def run(*args, stdin=None):
        return subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--temperature", "0",
                               "--max-new-tokens", "30", "--device", "cpu", *args], input=stdin,
                              capture_output=True, text=True, check=True, cwd=ROOT)
    from data import format_prompt
    lines = ["Tell me a story about a cat.", "Write about a dog."]
    alone = [run("--instruction", line).stdout[len(format_prompt(line, "")):] for line in lines]
    chat = run("--chat", stdin=f"{lines[0]}\n\n{'word ' * 600}\n{lines[1]}\n")
    assert chat.stdout == alone[0] + alone[1] and alone[0].endswith("\n")  # each answer ends its line
    assert "leaves no room in the context of 512" in chat.stderr
    assert chat.stderr.count("tokens/s") == 2


def test_packed_rows_equal_separate_sequences(tiny):
    """doc_ids confine attention to each document; positions restart per document."""
    a, b = PROMPTS[0]["input_ids"], PROMPTS[1]["input_ids"]
    tokens = torch.tensor([a + b])
    pos = torch.tensor([list(range(len(a))) + list(range(len(b)))])
    doc = torch.tensor([[0] * len(a) + [1] * len(b)])
    with torch.no_grad():
        packed = tiny(tokens, input_pos=pos, doc_ids=doc)[0]
        torch.testing.assert_close(packed[:len(a)], tiny(torch.tensor([a]))[0], atol=1e-4, rtol=1e-5)  # float32 rounding: other reduction order
        torch.testing.assert_close(packed[len(a):], tiny(torch.tensor([b]))[0], atol=1e-4, rtol=1e-5)  # float32 rounding: other reduction order


# ---------------------------------------------------------------------------------------------
# Random tiny configurations saved in HF (single / sharded) and Meta layouts load back identically
# ---------------------------------------------------------------------------------------------

CONFIGS = {
    "mha-untied": M.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=64, hidden_dim=48,
                              max_seq_len=64, tie_embeddings=False),
    "gqa-untied": M.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48,
                              max_seq_len=64, tie_embeddings=False),
    "gqa-tied": M.ModelArgs(dim=32, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=64, hidden_dim=40,
                            max_seq_len=64, tie_embeddings=True),
}


def random_model(args, seed=0):
    torch.manual_seed(seed)
    m = M.Transformer(args)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


def logits_of(model):
    tokens = torch.randint(0, model.args.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(tokens)


def save_meta(model, folder, n_shards=1):
    """Write Meta's layout independently of the loader: interleaved q/k rows, Meta names, MP shards."""
    a = model.args
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump({"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
                   "vocab_size": a.vocab_size, "norm_eps": a.norm_eps,
                   # Meta derives the MLP width: multiple_of * ceil(multiplier * int(8 * dim / 3) / multiple_of)
                   "multiple_of": a.hidden_dim, "ffn_dim_multiplier": 0.9 * a.hidden_dim / int(8 * a.dim / 3), "rope_theta": a.rope_theta}, f)

    def hf_to_meta(w, heads):  # rows (first half, second half) of each head -> interleaved pairs
        d = w.shape[0] // heads
        return w.view(heads, 2, d // 2, -1).transpose(1, 2).reshape(w.shape)

    sd = {"tok_embeddings.weight": (model.embed_tokens.weight, 1), "norm.weight": (model.norm.weight, None),
          "output.weight": (model.lm_head.weight, 0)}
    for i, l in enumerate(model.layers):
        at, mlp = l.self_attn, l.mlp
        sd.update({f"layers.{i}.attention.wq.weight": (hf_to_meta(at.q_proj.weight, a.n_heads), 0),
                   f"layers.{i}.attention.wk.weight": (hf_to_meta(at.k_proj.weight, a.n_kv_heads), 0),
                   f"layers.{i}.attention.wv.weight": (at.v_proj.weight, 0),
                   f"layers.{i}.attention.wo.weight": (at.o_proj.weight, 1),
                   f"layers.{i}.feed_forward.w1.weight": (mlp.gate_proj.weight, 0),
                   f"layers.{i}.feed_forward.w3.weight": (mlp.up_proj.weight, 0),
                   f"layers.{i}.feed_forward.w2.weight": (mlp.down_proj.weight, 1),
                   f"layers.{i}.attention_norm.weight": (l.input_layernorm.weight, None),
                   f"layers.{i}.ffn_norm.weight": (l.post_attention_layernorm.weight, None)})
    for s in range(n_shards):
        shard = {k: (v if d is None else v.chunk(n_shards, dim=d)[s]).detach().clone() for k, (v, d) in sd.items()}
        torch.save(shard, os.path.join(folder, f"consolidated.{s:02d}.pth"))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("layout", ["hf-single", "hf-sharded", "meta", "meta-2-shards"])
def test_checkpoint_round_trip(tmp_path, name, layout):
    args = CONFIGS[name]
    ref = random_model(args)
    if layout.startswith("hf"):
        M.save_hf_checkpoint(ref.state_dict(), args, str(tmp_path), max_shard_bytes=4000 if layout == "hf-sharded" else None)
        if layout == "hf-sharded":
            assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    else:
        if name == "gqa-tied":  # Meta's format has no tied head; untie by storing the copy
            pytest.skip("Meta's layout stores an untied output matrix")
        save_meta(ref, str(tmp_path), n_shards=2 if layout == "meta-2-shards" else 1)
    loaded = M.load_model(str(tmp_path))
    assert loaded.args.hidden_dim == args.hidden_dim and loaded.args.n_kv_heads == args.n_kv_heads
    torch.testing.assert_close(logits_of(loaded), logits_of(ref), atol=0, rtol=0)


def assert_bf16_close(last, ref):
    """bf16 last-position logits against transformers' float32 ones (the stored reference): bf16
    keeps 8 bits of mantissa (relative step 2^-8 = 0.4%), so logits of magnitude ~15 move by
    ~0.1 (measured in bf16 on a CPU: max 0.14, relative norm 0.3-0.5%)."""
    assert (last - ref).norm() / ref.norm() < 1e-2
    assert (last - ref).abs().max() < 0.3


def test_load_bf16_keeps_dtype_and_is_close(tiny):
    m = M.load_model(TINY, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m.lm_head.weight is m.embed_tokens.weight  # tied head stays tied
    for p in PROMPTS:
        with torch.no_grad():
            last = m(torch.tensor([p["input_ids"]]))[0, -1].float()
        assert_bf16_close(last, torch.tensor(p["last_logits"]))


# ---------------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------------

def test_generate_out_of_memory_is_one_line_with_what_to_try(monkeypatch):
    import generate

    def build_model(*a, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 250.00 MiB. GPU 0 has a total "
                                          "capacity of 11.76 GiB of which 120.06 MiB is free.")

    monkeypatch.setattr(generate, "build_model", build_model)
    with pytest.raises(SystemExit) as e:
        generate.cli(["--prompt", "Once upon a time", "--device", "cpu"])
    assert str(e.value.code).startswith("error: out of GPU memory (Tried to allocate 250.00 MiB): ")
    assert "--quant nf4" in str(e.value.code) and "\n" not in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        generate.cli(["--prompt", "Once upon a time", "--device", "cpu", "--quant", "nf4"])
    assert "--quant" not in str(e.value.code) and "a shorter prompt" in str(e.value.code)  # (already 4-bit)
    assert generate.allocation("no size given") == "no size given"


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        M.load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        M.load_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        M.load_tokenizer(str(tmp_path))

    args = CONFIGS["gqa-untied"]
    good = random_model(args).state_dict()
    bad = dict(good)
    del bad["layers.1.mlp.up_proj.weight"]
    M.save_hf_checkpoint(bad, args, str(tmp_path / "missing"))
    with pytest.raises(KeyError, match=r"model.layers.1.mlp.up_proj.weight"):
        M.load_model(str(tmp_path / "missing"))

    bad = dict(good, **{"layers.0.self_attn.extra.weight": torch.zeros(2)})
    M.save_hf_checkpoint(bad, args, str(tmp_path / "unexpected"))
    with pytest.raises(KeyError, match=r"unexpected.*self_attn.extra"):
        M.load_model(str(tmp_path / "unexpected"))

    bad = dict(good, **{"layers.0.self_attn.k_proj.weight": torch.zeros(32, 32)})
    M.save_hf_checkpoint(bad, args, str(tmp_path / "shape"))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj.weight has shape \(32, 32\), expected \(16, 32\)"):
        M.load_model(str(tmp_path / "shape"))

    os.makedirs(tmp_path / "gpt2")
    with open(tmp_path / "gpt2" / "config.json", "w") as f:
        json.dump({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, f)
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        M.load_model(str(tmp_path / "gpt2"))

    os.makedirs(tmp_path / "truncated")
    with open(tmp_path / "truncated" / "config.json", "w") as f:
        f.write('{"hidden_size": 64,')
    with pytest.raises(ValueError, match=r"truncated/config.json is not valid JSON"):
        M.load_model(str(tmp_path / "truncated"))


# ---------------------------------------------------------------------------------------------
# GPU: bf16 close to the float32 reference
# ---------------------------------------------------------------------------------------------

@cuda
@pytest.mark.parametrize("p", PROMPTS, ids=[p["prompt"] for p in PROMPTS])
def test_bf16_on_gpu_close_to_reference(p):
    m = M.load_model(TINY, device="cuda", dtype=torch.bfloat16)
    ids = torch.tensor([p["input_ids"]], device="cuda")
    with torch.no_grad():
        last = m(ids)[0, -1].float().cpu()
    assert_bf16_close(last, torch.tensor(p["last_logits"]))
    first = greedy(m, p["input_ids"], 8, use_cache=True)
    assert first == p["greedy_new_ids"][:8]


@cuda
def test_compiled_pointwise_on_gpu_matches_eager_and_reference(monkeypatch):
    """generate.py's --compile (model.compile_pointwise, on by default with CUDA): float32 logits
    as eager's up to the float32 summation order, and the greedy continuation through the KV
    cache and the CUDA graph equal to transformers' (the stored reference)."""
    monkeypatch.setattr(M, "POINTWISE", dict(M.POINTWISE))  # compile_pointwise swaps these in place
    m = M.load_model(TINY, device="cuda", dtype=torch.float32)
    p = PROMPTS[0]
    ids = torch.tensor([p["input_ids"]], device="cuda")
    with torch.no_grad():
        eager = m(ids)[0].cpu()
        M.compile_pointwise()
        compiled = m(ids)[0].cpu()
    assert M.POINTWISE["rms_norm"] is not M.rms_norm
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled[-1], torch.tensor(p["last_logits"]), atol=1e-4, rtol=0)
    assert greedy(m, p["input_ids"], 60, use_cache=True) == p["greedy_new_ids"]
    # one Decoder, its step captured once and replayed for every prompt after the first
    outs, expected = decode_in_turn(m)
    assert outs == expected
