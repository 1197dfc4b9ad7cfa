"""train.py on the CPU: learning, exact resume, token-normalized accumulation, NaN stop, atomic saves, errors.
checkpoint.py (saving, resuming, the metrics log, Ctrl-C) is tested here, through the runs that use it.

Runs call train.train(argv) in the test process (the bundled tiny model, --max-len 128, small batches)
except the command-line error tests, which run `python train.py` as a user would. References are
independent of train.py where it matters: the first step's loss is recomputed from full logits with
F.cross_entropy, example by example; resumed runs are compared with an uninterrupted run.
The CPU tests pin --device cpu (exact comparisons need fp32); one bf16 test runs when CUDA is there.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
from generate import build_model  # noqa: E402
from model import load_tokenizer  # noqa: E402
from test_graph_step import relative_difference  # noqa: E402  (tests/ is on sys.path: pytest puts it there)

CPU = ["--device", "cpu"]  # CPU tests, also on a GPU machine (exact comparisons need fp32)
FAST = CPU + ["--max-len", "128", "--batch-size", "4", "--samples", "0"]


def metrics(out):
    with open(os.path.join(out, checkpoint.METRICS)) as f:
        return [json.loads(line) for line in f]


def steps(out, keys=("step", "loss", "lr", "grad_norm", "target_tokens")):
    """The step records without the timing fields (which differ from run to run)."""
    return [{k: r[k] for k in keys} for r in metrics(out) if "loss" in r]


def evals(out):
    return [(r["step"], r["val_loss"]) for r in metrics(out) if "val_loss" in r]


def adapter(out):
    return load_file(os.path.join(out, "adapter_model.safetensors"))


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def patch_training_forward(monkeypatch, at_step, action):
    """Call action() inside the forward pass of training step `at_step` (1-based; evaluation passes don't count)."""
    real, seen = train.forward_loss, {"n": 0}

    def forward_loss(model, batch, **kw):
        if model.training:
            seen["n"] += 1
            if seen["n"] == at_step:
                action()
        return real(model, batch, **kw)

    monkeypatch.setattr(train, "forward_loss", forward_loss)


# ---------------------------------------------------------------------------------- learning

@pytest.fixture(scope="module")
def run40(tmp_path_factory):
    """40 steps on the bundled model and Alpaca sample; --lr 2e-3 because the 260K-parameter model
    moves slowly at the 7B default of 2e-4 (one epoch at 2e-4: held-out 4.11 -> 3.25)."""
    out = str(tmp_path_factory.mktemp("run40"))
    train.train(CPU + ["--out", out, "--max-steps", "40", "--lr", "2e-3", "--max-len", "128", "--eval-every", "20",
                       "--samples", "1"])
    return out


def test_40_steps_lower_the_loss(run40):
    losses = [r["loss"] for r in steps(run40)]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)  # seen: 4.13 -> 3.25
    ev = dict(evals(run40))
    assert sorted(ev) == [0, 20, 40]
    assert ev[40] < ev[0] - 0.5, ev  # seen: 4.16 -> 3.22


def test_metrics_and_files(run40):
    recs = metrics(run40)
    for r in recs:
        assert set(r) >= ({"step", "val_loss"} if "val_loss" in r else {"step", "loss", "lr", "tokens_per_s"})
        assert all(isinstance(v, (int, float)) for v in r.values())
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 41))
    lrs = [r["lr"] for r in recs if "loss" in r]
    # Warm-up to the peak over 10 steps, then cosine decay towards 0.
    assert lrs[9] == pytest.approx(2e-3) and lrs[0] == pytest.approx(2e-4)
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-5
    assert sorted(os.listdir(run40)) == ["adapter_config.json", "adapter_model.safetensors", "checkpoint.pt", "metrics.jsonl"]
    ckpt = torch.load(os.path.join(run40, checkpoint.CHECKPOINT), weights_only=True)
    assert ckpt["step"] == 40 and ckpt["world_size"] == 1
    # The PEFT-layout adapter holds the same weights as the checkpoint.
    saved = adapter(run40)
    assert len(saved) == len(ckpt["adapter"]) == 2 * 7 * 5
    for name, t in ckpt["adapter"].items():
        assert torch.equal(saved["base_model.model.model." + name], t)


# ---------------------------------------------------------------------------------- resume

RESUME = FAST + ["--max-steps", "12", "--lr", "1e-3", "--save-every", "4", "--eval-every", "3"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("whole"))
    train.train(["--out", out] + RESUME)
    return out


def assert_same_run(out, ref):
    assert steps(out) == steps(ref)  # exact: same data, same dropout masks, same optimizer state
    assert evals(out) == evals(ref)
    a, b = adapter(out), adapter(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_the_step_and_resume_continues_exactly(tmp_path, monkeypatch, uninterrupted):
    out = str(tmp_path)
    # A real SIGINT in the middle of step 7: the step finishes, is saved, and training stops.
    patch_training_forward(monkeypatch, 7, lambda: os.kill(os.getpid(), signal.SIGINT))
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(train.Interrupted, match="saved step 7"):
        train.train(["--out", out] + RESUME)
    assert torch.load(os.path.join(out, checkpoint.CHECKPOINT), weights_only=True)["step"] == 7
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    monkeypatch.undo()
    train.train(["--out", out, "--resume"] + RESUME)
    assert_same_run(out, uninterrupted)


def test_crash_then_resume_from_last_checkpoint(tmp_path, monkeypatch, uninterrupted):
    out = str(tmp_path)

    def crash():
        raise RuntimeError("simulated crash")

    patch_training_forward(monkeypatch, 7, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.train(["--out", out] + RESUME)
    assert torch.load(os.path.join(out, checkpoint.CHECKPOINT), weights_only=True)["step"] == 4  # --save-every 4
    assert [r["step"] for r in steps(out)] == [1, 2, 3, 4, 5, 6]  # logged past the checkpoint
    monkeypatch.undo()
    train.train(["--out", out, "--resume"] + RESUME)
    assert_same_run(out, uninterrupted)  # steps 5 and 6 were logged again, once


def test_out_of_memory_saves_the_last_step_and_resume_continues_exactly(tmp_path, monkeypatch, capsys, uninterrupted):
    """A micro-batch of step 7 runs out of memory (raised as PyTorch's allocator raises it): step 6, the last
    completed, is saved (--save-every 4 had saved step 4), the error is one line that says what to change,
    and --resume then repeats the uninterrupted run."""
    out = str(tmp_path)

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                     "79.11 GiB of which 1.25 GiB is free.")

    patch_training_forward(monkeypatch, 7, oom)
    with pytest.raises(SystemExit) as e:
        train.main(["--out", out] + RESUME)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = err.splitlines()[-1]  # (after the progress bar)
    assert err.startswith("error: out of GPU memory (Tried to allocate 2.00 GiB) in step 7, a micro-batch of 4 x ")
    assert f"the checkpoint of step 6 in {out} is intact" in err
    assert "--resume and --grad-ckpt" in err and "--no-cuda-graphs" not in err  # (no graphs on the CPU)
    assert torch.load(os.path.join(out, checkpoint.CHECKPOINT), weights_only=True)["step"] == 6
    assert [r["step"] for r in steps(out)] == [1, 2, 3, 4, 5, 6]
    monkeypatch.undo()
    train.train(["--out", out, "--resume"] + RESUME)
    assert_same_run(out, uninterrupted)


def test_out_of_memory_in_the_evaluation_saves_the_step(tmp_path, monkeypatch, capsys, uninterrupted):
    """The held-out evaluation after step 6 (--eval-every 3) runs out of memory: step 6 is saved all the same,
    and --resume goes on as the uninterrupted run (only the lost evaluation is missing)."""
    out = str(tmp_path)
    real, calls = train.evaluate, {"n": 0}

    def evaluate(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # step 0 (the base model), 3, then 6
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB.")
        return real(*a, **kw)

    monkeypatch.setattr(train, "evaluate", evaluate)
    with pytest.raises(SystemExit):
        train.main(["--out", out] + RESUME)
    err = capsys.readouterr().err.splitlines()[-1]
    assert "(Tried to allocate 20.00 MiB) in the held-out evaluation after step 6" in err, err
    assert torch.load(os.path.join(out, checkpoint.CHECKPOINT), weights_only=True)["step"] == 6
    monkeypatch.undo()
    train.train(["--out", out, "--resume"] + RESUME)
    assert steps(out) == steps(uninterrupted)
    assert evals(out) == [e for e in evals(uninterrupted) if e[0] != 6]
    a, b = adapter(out), adapter(uninterrupted)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_out_of_memory_message_names_only_what_helps():
    msg = str(train.out_of_memory("CUDA out of memory.", "step 1", None, "runs/x", "cpu", ["--grad-ckpt (...)"]))
    assert "in step 1:" in msg and "no checkpoint was saved" in msg
    assert "--resume" not in msg and "(CUDA out of memory.)" in msg  # nothing to resume; the allocator's words
    msg = str(train.out_of_memory("", "step 10", 9, "runs/x", "cpu", ["--grad-ckpt (...)"]))
    assert "the checkpoint of step 9 in runs/x is intact. To fit, continue with --resume and --grad-ckpt" in msg
    # what leaves a pass more memory: under graphs a smaller pool; eager, an evaluation gains nothing from either
    flags = [f.split()[0] for f in train.lighter_flags(grad_ckpt=False, graphs=True, evaluating=False)]
    assert flags == ["--no-cuda-graphs", "--grad-ckpt"]
    assert [f.split()[0] for f in train.lighter_flags(grad_ckpt=True, graphs=True, evaluating=True)] == ["--no-cuda-graphs"]
    assert [f.split()[0] for f in train.lighter_flags(grad_ckpt=False, graphs=False, evaluating=False)] == ["--grad-ckpt"]
    assert train.lighter_flags(grad_ckpt=False, graphs=False, evaluating=True) == []


def test_resume_refusals(tmp_path, uninterrupted):
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt in"):
        train.train(["--out", str(tmp_path), "--resume"] + RESUME)
    with pytest.raises(FileExistsError, match="--resume"):  # a fresh run would overwrite the checkpoint
        train.train(["--out", uninterrupted] + RESUME)
    with pytest.raises(ValueError, match=r"--batch-size 2 \(checkpoint: 4\)"):
        train.train(["--out", uninterrupted, "--resume"] + RESUME + ["--batch-size", "2"])
    # A checkpoint written by 2 processes cannot be resumed by 1.
    out = str(tmp_path / "two")
    os.makedirs(out)
    ckpt = torch.load(os.path.join(uninterrupted, checkpoint.CHECKPOINT), weights_only=True)
    torch.save({**ckpt, "world_size": 2}, os.path.join(out, checkpoint.CHECKPOINT))
    with pytest.raises(ValueError, match="trained by 2 process"):
        train.train(["--out", out, "--resume"] + RESUME)


def test_resume_takes_paths_as_the_files_they_name_and_says_when_nothing_is_left(tmp_path, uninterrupted, capsys):
    """The checkpoint holds --data as given (here the default, an absolute path): the same file spelled
    another way is the same data. A finished run resumed without more steps trains nothing and says so."""
    out = str(tmp_path / "copy")
    shutil.copytree(uninterrupted, out)
    before = {name: sha256(os.path.join(out, name)) for name in os.listdir(out)}
    data_dir = os.path.dirname(train.DEFAULT_DATA)
    same_file = os.path.join(data_dir, "..", os.path.basename(data_dir), ".", os.path.basename(train.DEFAULT_DATA))
    train.train(["--out", out, "--resume", "--data", same_file] + RESUME)
    assert "nothing to train: the checkpoint is at step 12" in capsys.readouterr().out
    assert {name: sha256(os.path.join(out, name)) for name in os.listdir(out)} == before
    other = str(tmp_path / "other.json")
    shutil.copy(train.DEFAULT_DATA, other)
    with pytest.raises(ValueError, match="--data"):  # another file is still refused
        train.train(["--out", out, "--resume", "--data", other] + RESUME)


def test_overwrite_removes_the_old_run_so_resume_cannot_mix_two(tmp_path, capsys):
    """A new run over an old one (--overwrite) that stops before its first save (a NaN at once) leaves no
    checkpoint of the old run for --resume to continue under the new run's log; its error says to start
    again, since there is nothing to resume."""
    out = str(tmp_path)
    train.train(["--out", out] + FAST + ["--max-steps", "2", "--save-every", "1", "--eval-every", "0"])
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "checkpoint.pt",
                                       "metrics.jsonl"]
    with pytest.raises(SystemExit):
        train.main(["--out", out, "--overwrite", "--lr", "1e36", "--warmup-steps", "0", "--max-grad-norm", "0",
                    "--max-steps", "10", "--save-every", "0", "--eval-every", "0"] + FAST)
    err = capsys.readouterr().err
    assert "error: loss nan" in err and "no checkpoint was saved (start again with a lower --lr)" in err, err
    assert os.listdir(out) == ["metrics.jsonl"] and metrics(out)[0] == {"step": 0, "val_loss": metrics(out)[0]["val_loss"]}
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt"):
        train.train(["--out", out, "--resume"] + FAST)


# ---------------------------------------------------------------------------------- accumulation

def test_accumulation_equals_big_batch_and_normalizes_by_tokens(tmp_path):
    """batch 4 x accumulation 2 == batch 8 x 1 on 8 training examples (each step sees all 8: the same rows
    whatever the grouping), and the step-1 loss is the mean over all target tokens, recomputed here."""
    with open(train.DEFAULT_DATA) as f:
        records = json.load(f)[:10]
    train_file, val_file = str(tmp_path / "train.json"), str(tmp_path / "val.json")
    with open(train_file, "w") as f:
        json.dump(records[:8], f)
    with open(val_file, "w") as f:
        json.dump(records[8:], f)

    def run(n_steps, batch_size, grad_accum):
        out = str(tmp_path / f"{n_steps}_{batch_size}x{grad_accum}")
        train.train(CPU + ["--data", train_file, "--val-data", val_file, "--max-len", "128", "--max-steps", str(n_steps),
                     "--lr", "1e-3", "--warmup-steps", "1", "--samples", "0", "--out", out, "--batch-size",
                     str(batch_size), "--grad-accum", str(grad_accum),
                     "--lora-dropout", "0"])  # no dropout: its masks depend on the batch shapes
        return out

    acc, big = run(3, 4, 2), run(3, 8, 1)
    for a, b in zip(steps(acc), steps(big)):
        assert a["target_tokens"] == b["target_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)  # scale-sensitive, unlike Adam's step
    wa, wb = adapter(acc), adapter(big)
    diff = relative_difference(wb, wa)
    assert diff < 1e-5, diff  # seen: 4e-8
    # Element by element after one step. Adam moves each weight by lr * m / (sqrt(v) + eps): the float noise
    # of a gradient element near 0 (~1e-11, from summing in another order) is amplified by up to lr / eps, so
    # the tolerance is 1% of lr (seen: 9e-7); a wrong weighting of the micro-batches flips signs: 2 * lr.
    wa, wb = adapter(run(1, 4, 2)), adapter(run(1, 8, 1))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5)
    acc = steps(acc)

    # Step 1 runs the base model (B = 0): its loss is sum of token losses / number of target tokens.
    tokenizer = load_tokenizer(train.DEFAULT_MODEL)
    model = build_model(train.DEFAULT_MODEL, "cpu", torch.float32, "nf4")
    total, count, per_example = 0.0, 0, []
    with torch.no_grad():
        for rec in records[:8]:
            ex = data.tokenize_example(tokenizer, rec, max_len=128)
            ids, labels = torch.tensor([ex.input_ids]), torch.tensor(ex.labels)
            logits = model(ids)[0].double()
            loss = F.cross_entropy(logits[:-1], labels[1:], ignore_index=data.IGNORE_INDEX, reduction="sum")
            n = int((labels[1:] != data.IGNORE_INDEX).sum())
            total, count = total + loss.item(), count + n
            per_example.append(loss.item() / n)
    assert acc[0]["target_tokens"] == count
    assert acc[0]["loss"] == pytest.approx(total / count, rel=1e-5)
    # The test can tell: a mean of per-example (or per-micro-batch) means is another number.
    assert abs(sum(per_example) / 8 - total / count) > 1e-2


# ---------------------------------------------------------------------------------- failures

def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """An absurd learning rate (1e36, no clipping) makes the adapters overflow to inf and the loss NaN."""
    out = str(tmp_path)
    hashes = []
    real_save = checkpoint.save_checkpoint

    def save_and_hash(out_dir, *a, **kw):
        real_save(out_dir, *a, **kw)
        hashes.append(sha256(os.path.join(out_dir, checkpoint.CHECKPOINT)))

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_and_hash)
    with pytest.raises(SystemExit) as e:
        train.main(["--out", out, "--lr", "1e36", "--warmup-steps", "0", "--max-grad-norm", "0", "--save-every", "1",
                    "--max-steps", "10"] + FAST)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "error: loss nan" in err and "is intact" in err and "Traceback" not in err
    done = len(steps(out))  # steps completed (all logged) before the non-finite one
    assert done >= 1 and len(hashes) == done
    assert sha256(os.path.join(out, checkpoint.CHECKPOINT)) == hashes[-1]  # not touched after its save
    ckpt = torch.load(os.path.join(out, checkpoint.CHECKPOINT), weights_only=True)
    assert ckpt["step"] == done and f"at step {done + 1}" in err
    assert all(torch.isfinite(t).all() for t in ckpt["adapter"].values())
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch, uninterrupted):
    """A save that fails half-way (disk full) leaves the previous checkpoint whole and no temporary file."""
    out = str(tmp_path)
    train.train(["--out", out] + FAST + ["--max-steps", "2", "--save-every", "1", "--eval-every", "0"])
    before = sha256(os.path.join(out, checkpoint.CHECKPOINT))

    def torch_save_fails(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", torch_save_fails)
    model = build_model(train.DEFAULT_MODEL, "cpu", torch.float32, "nf4")
    train.add_lora(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(OSError, match="No space"):
        checkpoint.save_checkpoint(out, model, optimizer, 3, 1, {"model": train.DEFAULT_MODEL})
    assert sha256(os.path.join(out, checkpoint.CHECKPOINT)) == before
    for run in (out, uninterrupted):
        assert not [f for f in os.listdir(run) if f.endswith(".tmp") or f.startswith(".")]


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file-size limits")
def test_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """A real failed write: `python train.py --resume` under a file-size limit (RLIMIT_FSIZE) that the
    checkpoint of step 3 passes, as a full disk would fail it (torch.save raises an OSError here, a RuntimeError
    when the disk fills elsewhere in the file). One line names what is still there: step 2's checkpoint, whole."""
    import resource

    out = str(tmp_path)
    args = FAST + ["--out", out, "--save-every", "1", "--eval-every", "0"]
    train.train(args + ["--max-steps", "2"])
    size = os.path.getsize(os.path.join(out, checkpoint.CHECKPOINT))
    before = sha256(os.path.join(out, checkpoint.CHECKPOINT))

    def limit():  # (in the child: files stop growing at half a checkpoint; a write past that fails)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    run = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--resume", "--max-steps", "4", *args],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, preexec_fn=limit)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    last = run.stderr.splitlines()[-1]
    assert last.startswith(f"error: could not save step 3 to {out} (") and "MiB free there)" in last, last
    assert last.endswith(": checkpoint.pt there holds step 2"), last
    assert sha256(os.path.join(out, checkpoint.CHECKPOINT)) == before
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_a_failed_adapter_write_names_the_checkpoint_already_written(tmp_path, monkeypatch, capsys):
    """checkpoint.pt is written before the adapter's files: when those fail, it already holds the new step."""
    out = str(tmp_path)
    real, calls = checkpoint.save_adapter, {"n": 0}

    def save_adapter(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("Error while serializing: IoError(No space left on device (os error 28))\nmore")
        real(*a, **kw)

    monkeypatch.setattr(checkpoint, "save_adapter", save_adapter)
    with pytest.raises(SystemExit) as e:
        train.main(["--out", out, "--max-steps", "5", "--save-every", "1", "--eval-every", "0"] + FAST)
    assert e.value.code == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"error: could not save step 3 to {out} (Error while serializing: IoError(No space "
                           "left on device (os error 28)); ") and last.endswith(": checkpoint.pt there holds step 3")


def cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_bad_input_errors_from_the_command_line(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c", "output": }]')
    bad_record = tmp_path / "record.json"
    bad_record.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    not_a_model = tmp_path / "empty_model"
    not_a_model.mkdir()
    cases = [
        (["--data", str(tmp_path / "missing.json")], [str(tmp_path / "missing.json"), "not found"]),
        (["--data", str(bad_json)], [str(bad_json), "invalid JSON at line 2"]),
        (["--data", str(bad_record)], [str(bad_record), "record 1", "'output'"]),
        (["--model", str(not_a_model)], [str(not_a_model), "not a LLaMA checkpoint"]),
    ]
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases.append((["--out", str(a_file)], [str(a_file), "is a file, not a folder"]))
    for args, needles in cases:
        r = cli(*CPU, "--out", str(tmp_path / "out"), *args)
        assert r.returncode == 1, (args, r.stderr)
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and all(n in last for n in needles), (args, r.stderr)
        assert "Traceback" not in r.stderr
        assert not (tmp_path / "out").exists()  # a refused run leaves no empty output folder


def test_a_gpu_without_bf16_is_refused(tmp_path, monkeypatch):
    """A T4 or V100 (compute capability 7.x) has no bf16, which training computes in: a clear
    error before anything runs (generate.py takes fp16 there instead)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ValueError, match=r"Tesla T4 \(compute capability 7.5\) has no bf16"):
        train.train(["--device", "cuda", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    import generate
    assert generate.default_dtype("cuda") == torch.float16 and generate.default_dtype("cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert generate.default_dtype("cuda:0") == torch.bfloat16


def test_refusals_before_anything_loads(tmp_path, capsys, monkeypatch):
    """Flags that cannot work, refused with one line before the data or the model are read."""
    for flag, value in (("--max-steps", "-3"), ("--save-every", "-1"), ("--eval-every", "-1")):
        with pytest.raises(SystemExit):
            train.parse_args([flag, value])
        assert f"{flag} must be at least 0, got {value}" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint.pt in"):
        train.train(["--out", str(tmp_path / "none"), "--resume"] + FAST)
    assert "examples from" not in capsys.readouterr().out  # (the data report) refused before the data
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: torch .* (is built without CUDA|sees no GPU); use --device cpu"):
        train.train(["--device", "cuda", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists() and not (tmp_path / "none").exists()


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    for cls in (train.ModelArguments, train.DataArguments, train.TrainingArguments):
        for f in train.dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in text and len(f.metadata["help"]) > 15


# ---------------------------------------------------------------------------------- GPU

@pytest.mark.cuda
def test_gpu_bf16_qlora_learns_and_resumes(tmp_path, monkeypatch, capsys):
    """On CUDA: bf16 compute, the NF4 base through the Triton kernels, gradient checkpointing with the default
    dropout, under CUDA graphs (dropout.py). It learns, and a crash + resume ends where the uninterrupted run
    does (bitwise if the GPU kernels are deterministic; the tolerances leave room for atomics in backward
    kernels)."""
    gpu = ["--device", "cuda", "--max-len", "128", "--batch-size", "8", "--lr", "2e-3", "--max-steps", "30",
           "--save-every", "10", "--eval-every", "10", "--grad-ckpt"]
    whole = str(tmp_path / "whole")
    train.train(gpu + ["--out", whole, "--samples", "1"])
    assert "CUDA graphs: on" in capsys.readouterr().out
    losses = [r["loss"] for r in steps(whole)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    ev = dict(evals(whole))
    assert ev[30] < ev[0] - 0.3, ev
    assert all(0 < r["max_mem_gib"] < 2 for r in metrics(whole) if "loss" in r)

    out = str(tmp_path / "resumed")
    crash_at_step(monkeypatch, 14)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.train(gpu + ["--out", out, "--samples", "0"])
    monkeypatch.undo()
    train.train(gpu + ["--out", out, "--samples", "0", "--resume"])
    assert_gpu_resume_matches(out, whole, "GPU resume")


def crash_at_step(monkeypatch, at_step):
    """Raise inside training step `at_step` (0-based), on the host: a replayed CUDA graph calls no Python
    of the forward (patch_training_forward would never fire)."""
    real_lr_at = train.lr_at

    def lr_at(step, args, total):
        if step == at_step:
            raise RuntimeError("simulated crash")
        return real_lr_at(step, args, total)
    monkeypatch.setattr(train, "lr_at", lr_at)


def assert_gpu_resume_matches(out, whole, what):
    """The resumed run's steps and adapter are the uninterrupted run's (bitwise if the GPU kernels are
    deterministic; the tolerances leave room for atomics in backward kernels)."""
    for a, b in zip(steps(out), steps(whole), strict=True):
        assert a["step"] == b["step"] and a["target_tokens"] == b["target_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-2)
    wa, wb = adapter(out), adapter(whole)
    diff = relative_difference(wa, wb)
    print(f"{what}: relative adapter difference {diff:.2e}")
    assert diff < 1e-2


@pytest.mark.cuda
def test_gpu_cuda_graphs_train_like_eager_and_resume(tmp_path, monkeypatch, capsys):
    """The default on one GPU: each micro-batch replayed as a CUDA graph, RMSNorm, rotary and SwiGLU
    compiled (dropout on, no checkpointing). It trains as the eager run does (rows padded, the loss over
    every position, the fused pointwise kernels: rounding apart, the same numbers), and a crash + resume
    ends where the uninterrupted graph run does."""
    import model as M
    gpu = ["--device", "cuda", "--max-len", "128", "--batch-size", "8", "--lr", "2e-3", "--max-steps", "20",
           "--save-every", "10", "--eval-every", "10", "--samples", "0", "--lora-dropout", "0.1"]
    graphs, eager = str(tmp_path / "graphs"), str(tmp_path / "eager")
    train.train(gpu + ["--out", graphs])
    assert "CUDA graphs: on (graph_step.py); pointwise compiled" in capsys.readouterr().out
    assert M.POINTWISE == M.EAGER_POINTWISE  # put back for whatever runs next in this process
    train.train(gpu + ["--out", eager, "--no-cuda-graphs"])
    out = capsys.readouterr().out
    assert "CUDA graphs: off (--no-cuda-graphs)" in out and "compiled" not in out
    worst = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(steps(graphs), steps(eager), strict=True))
    print(f"graphs against eager: largest relative step-loss difference {worst:.2e}")
    assert worst < 1e-2

    out = str(tmp_path / "resumed")
    crash_at_step(monkeypatch, 14)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.train(gpu + ["--out", out])
    monkeypatch.undo()
    train.train(gpu + ["--out", out, "--resume"])
    assert_gpu_resume_matches(out, graphs, "GPU graph resume")
