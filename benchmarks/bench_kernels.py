"""Benchmark of the 4-bit kernels on LLaMA-7B linear shapes, against cuBLAS bf16 and bitsandbytes.

    python3 benchmarks/bench_kernels.py --out kernels.json          (under 3 minutes on an H100)

For (N, K) in (4096, 4096), (11008, 4096), (4096, 11008) (y = x @ W.T, W is N x K: q/o, gate/up,
down projections) and M in 1, 16, 4096 tokens it times, in one run, with
triton.testing.do_bench (median, fresh random bf16 inputs, never zeros):
    cublas        torch.matmul(x, W_bf16.T)                    (the 16-bit baseline)
    fused         kernels.fused_matmul(x, W_nf4)               (autotuned; tiles dequantized on chip)
    skinny        kernels.skinny_matmul(x, W_nf4), M <= 16, split-K (config tuned once per shape)
    skinny graph  the same, timed inside a CUDA graph (20 calls captured, replayed, divided):
                  what decoding sees, without the ~20 us of Python launch overhead per call
    skinny HBM    at M = 1: the same graph over 8 different weights in turn (8 x the weight >
                  the 50 MB L2), so that W comes from HBM as it does when a model decodes; the
                  M = 1 targets are checked on this column
    skinny old    SPLIT_K = 1, LOOKUP 0 (the first commit's one-program-per-row-block kernel),
                  eager and in a graph
    deq+cublas    x @ kernels.dequantize(W_nf4).T              (the alternative for large M)
    dispatch      quant._matmul: what QuantLinear runs at this M
    dequant       kernels.dequantize(W_nf4, bf16)              (independent of M)
    dx            kernels.fused_matmul_dx(dy, W_nf4), autotuned (backward, dy is M x N)
    cublas dx     dy @ W_bf16
    bnb           bitsandbytes.matmul_4bit and bnb dequantize_4bit (if bitsandbytes imports),
                  NF4, block 64, double quantization (compress_statistics), as QLoRA uses it;
                  at M = 1 also `bnb HBM`, matmul_4bit in the same 8-weight graph as skinny HBM
Our weight: quant.quantize_nf4 with double quantization (4.127 bits per weight).
At M >= 1024, cublas, fused, deq+cublas and bnb matmul are timed in --rounds (5) interleaved
rounds, and the table gives each one's median over them: cuBLAS alone moved 490-575 us at
11008x4096 between runs that timed it once, which made a ratio from one measurement unreliable.
There they are timed on the GPU alone (bench_gpu): do_bench's events around a call also count the
host's time to launch it whenever that is longer than the L2 flush before it, and the Gluon fused
kernel's launch takes 120-270 us of Python and driver calls, about its 190 us on the GPU at
4096x4096 (rounds of 1.1-3x its GPU time in the thirty-sixth session). The host's time per call
is printed beside (host_us).
Then:
  - a lookup table (4096x4096, M = 4096, one fixed tile): fused and dx with LOOKUP 0 / 1 / 2 (/ 3) and
    with INT4 weights (no code lookup at all), to see what the dequantization costs;
  - a sweep of M (64, 256, 512, 1024, 2048, 3072, and 4096 from above) for fused vs deq+cublas,
    GPU time (bench_gpu: what a CUDA graph replays, train.py's default), to set
    quant.DEQUANT_MATMUL_MIN_M and, on Hopper, where fused runs the Gluon kernel (M > 128),
    quant.FUSED_SM90_MIN_TILES.
The sweep and the LOOKUP table are skipped once the run is past --budget-s (170 s).

Prints markdown tables and checks the targets: fused <= 1.05 x cuBLAS at M = 4096; at M = 1,
skinny HBM >= 60% of the measured HBM bandwidth (a device-to-device copy of 512 MiB timed in the
same run: about 3.0 TB/s on an H100 SXM, against its 3.35 TB/s peak, --hbm-gbps, also shown)
and at least 2x faster than bnb HBM. Each check is on every shape; the ones marked "issue" are the
targets as issue 3 states them (the fused one on all three shapes, the M = 1 ones at 11008x4096,
the shape it gives "about 12.5 us" for), the others ("ours") are the same bars at the other shapes,
which we hold ourselves to as well and report however they come out. Writes JSON to --out. A
measurement that fails (e.g. a config that does not compile) prints ERR and the error on stderr;
the run goes on. Needs CUDA. Autotuning and config choice happen in the first (warm-up) call of
each measurement and are not timed.
"""

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
GRAPH_CALLS = 20
COPIES = 8  # weights a graph cycles through to read W from HBM (8 x 22.5 MB > the 50 MB L2)


def bench(fn):
    """Median time of fn() in microseconds (do_bench: back-to-back eager calls)."""
    import triton.testing

    fn()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    q = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return 1000.0 * (q[0] if isinstance(q, (list, tuple)) else q)


def bench_gpu(fn, reps=100, host_slack_us=600):
    """Median GPU time of fn() in microseconds, as do_bench (L2 flushed before each call, events
    around it), with a GPU sleep of host_slack_us queued between the flush and the call: the host
    launches fn while the GPU sleeps, so the events time the kernels alone, not the launch."""
    fn()  # compile / autotune outside the timing
    cache = torch.empty(int(256e6 // 4), dtype=torch.int, device="cuda")
    cycles = int(host_slack_us * 2000)  # cycles at 2 GHz; at a lower clock the sleep is longer
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        cache.zero_()
        torch.cuda._sleep(cycles)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(1000.0 * s.elapsed_time(e) for s, e in events)


def host_time(fn, calls=50):
    """Microseconds of host time per fn() call, the GPU left to run behind."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t = time.perf_counter() - t0
    torch.cuda.synchronize()
    return 1e6 * t / calls


def bench_rounds(fns, rounds, label=""):
    """{name: median over `rounds` rounds} for fns {name: fn}, timed by bench_gpu when rounds > 1
    (M >= 1024), else by bench; each round times every fn in turn, so that the GPU's clock and
    temperature drift reach all of them alike. A name whose every measurement failed maps to None."""
    times = {name: [] for name in fns}
    timer = bench_gpu if rounds > 1 else bench
    for _ in range(rounds):
        for name, fn in fns.items():
            t = attempt(f"{name} {label}", timer, fn)
            if t is not None:
                times[name].append(t)
    medians = {name: statistics.median(v) if v else None for name, v in times.items()}
    if rounds > 1:  # each round's time too, to tell an outlier run from a slow kernel
        medians.update({name.replace("_us", "_rounds_us"): [round(t, 1) for t in v] for name, v in times.items()})
    return medians


def bench_graph(fn, calls=GRAPH_CALLS, replays=30, back_to_back=1):
    """Microseconds per call of fn() inside a CUDA graph of `calls` calls (median of replays).
    back_to_back > 1: each timing replays the graph that many times in a row, so the graph's own
    start is paid once for all of them (stream_floor.py's measure)."""
    fn()  # compile / choose the config outside the capture
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm the allocator on a side stream, as capture requires
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(back_to_back):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(1000.0 * start.elapsed_time(end) / (calls * back_to_back))
    times.sort()
    return times[len(times) // 2]


def cycling(fn_of_index, copies=COPIES):
    """A function that calls fn_of_index(1), fn_of_index(2), ... modulo `copies`: captured in a
    graph, each call reads another weight."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % copies
        return fn_of_index(state["i"])
    return call


def copy_gbps(dev, mib=512):
    """The HBM bandwidth a device-to-device copy reaches (GB/s, bytes read + written): the
    'measured HBM bandwidth' of the decoding target."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    us = bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (us * 1e-6) / 1e9


def attempt(label, fn, *args):
    """fn(*args), or None after printing the error (the benchmark goes on)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 (report every failure, keep measuring the rest)
        print(f"ERR {label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr)
        if os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
        return None


def best_config(module_name, attr):
    """The config the autotuner last used for kernels.<module>.<attr>, as a string."""
    tuner = getattr(importlib.import_module(f"kernels.{module_name}"), attr)
    cfg = getattr(tuner, "best_config", None)
    return None if cfg is None else str(cfg)


def config_dict(cfg):
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def load_bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional as bf
    except (ImportError, RuntimeError, OSError) as e:  # missing, or built without this CUDA
        return None, f"bitsandbytes not usable: {type(e).__name__}: {e}"
    return (bitsandbytes, bf), f"bitsandbytes {bitsandbytes.__version__}"


def weight_bytes(qw):
    ts = [qw.packed, qw.scales, qw.zeros, qw.absmax2, qw.offset]
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def fmt_us(v):
    return "ERR" if v is None else ("-" if v == "-" else f"{v:.1f}")


def decode_from_hbm(n, k, x, bnb, randn):
    """M = 1 in a CUDA graph that cycles through COPIES new random weights of the shape, ours and
    bitsandbytes' (the same weights): {"skinny_hbm_us": .., "bnb_hbm_us": ..} (None: an error)."""
    import kernels
    import quant
    qws, bws = [], []
    for _ in range(COPIES):
        w = randn(n, k, scale=0.02)
        qws.append(quant.quantize_nf4(w, 64, double_quant=True))
        if bnb is not None:
            bws.append(attempt("bnb quantize", lambda: bnb[1].quantize_4bit(
                w, blocksize=64, quant_type="nf4", compress_statistics=True)))
    for q in qws:  # each weight's decoder tables are built on its first call, outside the capture
        attempt("skinny HBM warm-up", kernels.skinny_matmul, x, q)
    out = {"skinny_hbm_us": attempt(f"skinny HBM {n}x{k}", bench_graph,
                                    cycling(lambda i: kernels.skinny_matmul(x, qws[i])))}
    out["bnb_hbm_us"] = "-"
    if bws and all(b is not None for b in bws):
        out["bnb_hbm_us"] = attempt(f"bnb HBM {n}x{k}", bench_graph, cycling(
            lambda i: bnb[0].matmul_4bit(x, bws[i][0].t(), quant_state=bws[i][1])))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the results as JSON to this path")
    ap.add_argument("--ms", default="1,16,4096", help="token counts M, comma-separated")
    ap.add_argument("--sweep", default="64,256,512,1024,2048,3072",
                    help="M values for the fused vs dequantize+cuBLAS sweep ('' to skip); the "
                         "table adds the M = 4096 rows of the main measurement")
    ap.add_argument("--budget-s", type=float, default=170.0,
                    help="after this many seconds the sweep and the LOOKUP table are skipped")
    ap.add_argument("--no-lookup-table", action="store_true", help="skip the LOOKUP comparison")
    ap.add_argument("--hbm-gbps", type=float, default=3350.0,
                    help="peak HBM bandwidth (GB/s), shown beside the measured one (a copy)")
    ap.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes")
    ap.add_argument("--rounds", type=int, default=5,
                    help="interleaved rounds for cuBLAS, fused, deq+cuBLAS and bnb at M >= 1024 "
                         "(median of each; 1: one measurement each, as at smaller M)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")

    import triton

    import kernels
    import quant
    # the modules (for their config lists): `from kernels import fused_matmul` would give the
    # function that kernels/__init__.py re-exports under the module's name
    fm, fdx, sk = (importlib.import_module(f"kernels.{name}")
                   for name in ("fused_matmul", "fused_matmul_dx", "skinny_matmul"))

    t_start = time.time()
    ms = [int(m) for m in args.ms.split(",") if m]
    sweep = [int(m) for m in args.sweep.split(",") if m]
    bnb, bnb_note = (None, "bitsandbytes skipped (--no-bnb)") if args.no_bnb else load_bnb()
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32) * scale).to(dtype)

    # "old" = the first commit's skinny kernel: SPLIT_K=1, LOOKUP=0, its first M=1 / M=16 tile.
    # (The fused and dx kernels' first-commit tiles, LOOKUP=0 unswapped, no longer compile on
    # sm_90 with Triton 3.6: kernels/fused_matmul.py, LARGE_M_CONFIGS.)
    old_skinny = {1: {"BLOCK_N": 32, "BLOCK_K": 256, "LOOKUP": 0, "SPLIT_K": 1, "num_warps": 4,
                      "num_stages": 3},
                  16: {"BLOCK_N": 32, "BLOCK_K": 128, "LOOKUP": 0, "SPLIT_K": 1, "num_warps": 4,
                       "num_stages": 4}}

    env = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "bitsandbytes": bnb_note,
        "sms": torch.cuda.get_device_properties(dev).multi_processor_count,
        "SKINNY_MAX_M": quant.SKINNY_MAX_M, "DEQUANT_MATMUL_MIN_M": quant.DEQUANT_MATMUL_MIN_M,
        "FUSED_SM90_MIN_TILES": quant.FUSED_SM90_MIN_TILES,
    }
    env["hbm_copy_gbps"] = copy_gbps(dev)
    print(f"# 4-bit kernels: {env['gpu']} ({env['sms']} SMs), torch {env['torch']}, "
          f"triton {env['triton']}; {bnb_note}; HBM: {env['hbm_copy_gbps']:.0f} GB/s measured "
          f"(device-to-device copy), {args.hbm_gbps:.0f} GB/s peak (--hbm-gbps)\n")

    rows, sweep_rows, lookup_rows = [], [], []
    for n, k in SHAPES:
        w = randn(n, k, scale=0.02)
        qw = quant.quantize_nf4(w, 64, double_quant=True)
        wq_bytes = weight_bytes(qw)
        t_dequant = attempt("dequant", bench, lambda: kernels.dequantize(qw, dtype))
        cfg_dequant = best_config("dequantize", "_dequantize_tuned")
        bnb_w, t_bnb_dequant = None, None
        if bnb is not None:
            _, bf = bnb
            bnb_w = attempt("bnb quantize", lambda: bf.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                                     compress_statistics=True))
            if bnb_w is not None:
                packed_bnb, state_bnb = bnb_w
                t_bnb_dequant = attempt("bnb dequant", bench,
                                        lambda: bf.dequantize_4bit(packed_bnb, state_bnb))
        for m in ms:
            x = randn(m, k)
            dy = randn(m, n)
            size = "large" if m > 128 else "small"
            r = {"N": n, "K": k, "M": m, "weight_bytes": wq_bytes, "configs": {}}
            # the times the targets compare: at M >= 1024 in interleaved rounds (bench_rounds)
            fns = {"cublas_us": lambda: torch.matmul(x, w.t()),
                   "fused_us": lambda: kernels.fused_matmul(x, qw),
                   "dequant_cublas_us": lambda: torch.matmul(x, kernels.dequantize(qw, dtype).t())}
            r["bnb_matmul_us"] = r["bnb_dequant_us"] = "-"
            if bnb_w is not None:
                lib = bnb[0]
                packed_bnb, state_bnb = bnb_w
                fns["bnb_matmul_us"] = lambda: lib.matmul_4bit(x, packed_bnb.t(), quant_state=state_bnb)
                r["bnb_dequant_us"] = t_bnb_dequant
            r["rounds"] = args.rounds if m >= 1024 else 1
            r.update(bench_rounds(fns, r["rounds"], f"{n}x{k} M={m}"))
            if r["rounds"] > 1:
                r["host_us"] = {name.replace("_us", ""): attempt(f"host {name}", host_time, fn)
                                for name, fn in fns.items()}
            r["configs"]["fused"] = best_config("fused_matmul", f"_prmt_{size}_m_tuned")  # NF4, bf16
            if m > 128 and kernels.fused_matmul_sm90.sm90_ok(x, qw):  # the Gluon kernel ran instead
                offset = kernels.fused_matmul_sm90.table_offset(x.device)
                r["configs"]["fused"] = f"fused_matmul_sm90, decoding table at {offset} (-1: global memory)"
            r["skinny_us"] = r["skinny_graph_us"] = r["skinny_old_us"] = r["skinny_old_graph_us"] = "-"
            r["skinny_hbm_us"] = r["bnb_hbm_us"] = "-"
            if m <= 16:
                r["skinny_us"] = attempt(f"skinny {n}x{k} M={m}", bench, lambda: kernels.skinny_matmul(x, qw))
                r["configs"]["skinny"] = str(attempt("skinny config", sk.chosen_config, x, qw))
                r["skinny_graph_us"] = attempt(f"skinny graph {n}x{k} M={m}", bench_graph,
                                               lambda: kernels.skinny_matmul(x, qw))
                oc = old_skinny[1 if m == 1 else 16]
                r["skinny_old_us"] = attempt("skinny old", bench, lambda: kernels.skinny_matmul(x, qw, config=oc))
                r["skinny_old_graph_us"] = attempt("skinny old graph", bench_graph,
                                                   lambda: kernels.skinny_matmul(x, qw, config=oc))
                if m == 1:
                    r.update(decode_from_hbm(n, k, x, bnb, randn))
                moved = wq_bytes + x.numel() * 2 + m * n * 2
                for name in ("skinny_hbm_us", "skinny_graph_us", "skinny_us"):
                    if isinstance(r.get(name), float):
                        gbps = moved / (r[name] * 1e-6) / 1e9
                        r[name.replace("_us", "_pct_peak")] = 100.0 * gbps / args.hbm_gbps
                        r[name.replace("_us", "_pct_measured")] = 100.0 * gbps / env["hbm_copy_gbps"]
            r["dispatch_us"] = attempt("dispatch", bench, lambda: quant._matmul(x, qw))
            r["dequant_us"] = t_dequant
            r["configs"]["dequant"] = cfg_dequant
            r["dx_us"] = attempt(f"dx {n}x{k} M={m}", bench, lambda: kernels.fused_matmul_dx(dy, qw))
            r["configs"]["dx"] = best_config("fused_matmul_dx", f"_{size}_m_tuned")
            r["cublas_dx_us"] = attempt("cublas dx", bench, lambda: torch.matmul(dy, w))
            ok = isinstance(r["fused_us"], float) and isinstance(r["cublas_us"], float)
            r["fused_vs_cublas"] = r["fused_us"] / r["cublas_us"] if ok else None
            rows.append(r)
            print(f"  measured N={n} K={k} M={m}  ({time.time() - t_start:.0f} s)", file=sys.stderr)
        for m in sweep:
            if time.time() - t_start > args.budget_s:
                print(f"  SKIP sweep N={n} K={k} M={m}: past --budget-s", file=sys.stderr)
                continue
            x = randn(m, k)
            sweep_rows.append({
                "N": n, "K": k, "M": m,
                "fused_us": attempt("sweep fused", bench_gpu, lambda: kernels.fused_matmul(x, qw)),
                "dequant_cublas_us": attempt("sweep deq+cublas", bench_gpu,
                                             lambda: torch.matmul(x, kernels.dequantize(qw, dtype).t())),
                "cublas_us": attempt("sweep cublas", bench_gpu, lambda: torch.matmul(x, w.t())),
            })
        print(f"  sweep N={n} K={k}  ({time.time() - t_start:.0f} s)", file=sys.stderr)

    if not args.no_lookup_table and time.time() - t_start > args.budget_s:
        print("  SKIP lookup table: past --budget-s", file=sys.stderr)
    elif not args.no_lookup_table:
        n, k, m = 4096, 4096, 4096
        x, dy = randn(m, k), randn(m, n)
        w = randn(n, k, scale=0.02)
        weights = {"nf4dq": quant.quantize_nf4(w, 64, double_quant=True),
                   "int4": quant.quantize_int4(w, 64)}
        tile_f, tile_dx = config_dict(fm.LARGE_M_CONFIGS[0]), config_dict(fdx.LARGE_M_CONFIGS[0])
        for fmt_name, lookups in (("nf4dq", (0, 1, 2, 3)), ("int4", (0, 2))):
            qw = weights[fmt_name]
            for lookup in lookups:
                lookup_rows.append({
                    "format": fmt_name, "LOOKUP": lookup, "tile_fused": str(tile_f), "tile_dx": str(tile_dx),
                    "fused_us": attempt(f"lookup fused {fmt_name} {lookup}", bench,
                                        lambda: kernels.fused_matmul(x, qw, config={**tile_f, "LOOKUP": lookup})),
                    "dx_us": "-" if lookup == 3 else attempt(  # (no LOOKUP 3 in the dx kernel)
                        f"lookup dx {fmt_name} {lookup}", bench,
                        lambda: kernels.fused_matmul_dx(dy, qw, config={**tile_dx, "LOOKUP": lookup})),
                })
        print(f"  lookup table  ({time.time() - t_start:.0f} s)", file=sys.stderr)

    print("| N x K | M | cuBLAS bf16 | fused | skinny | skinny graph | skinny HBM | "
          "skinny old | skinny old graph | deq+cuBLAS | dispatch | dequant | dx | cuBLAS dx "
          "| bnb matmul | bnb HBM | bnb dequant | fused/cuBLAS | skinny HBM: % of measured / peak |")
    print("|" + "---|" * 19)
    for r in rows:
        hbm = "-"
        if r.get("skinny_hbm_pct_measured"):
            hbm = f"{r['skinny_hbm_pct_measured']:.0f}% / {r['skinny_hbm_pct_peak']:.0f}%"
        ratio = "ERR" if r["fused_vs_cublas"] is None else f"{r['fused_vs_cublas']:.2f}"
        cols = [r[c] for c in ("cublas_us", "fused_us", "skinny_us", "skinny_graph_us",
                               "skinny_hbm_us", "skinny_old_us", "skinny_old_graph_us",
                               "dequant_cublas_us", "dispatch_us", "dequant_us", "dx_us",
                               "cublas_dx_us", "bnb_matmul_us", "bnb_hbm_us", "bnb_dequant_us")]
        print(f"| {r['N']}x{r['K']} | {r['M']} | " + " | ".join(fmt_us(c) for c in cols)
              + f" | {ratio} | {hbm} |")
    print("\n(times in microseconds: median of do_bench, or per call inside a CUDA graph; at M >= 1024 "
          "cuBLAS, fused, deq+cuBLAS and bnb matmul in GPU time alone (bench_gpu); HBM: a "
          f"graph cycling through {COPIES} weights; measured HBM bandwidth "
          f"{env['hbm_copy_gbps']:.0f} GB/s, peak {args.hbm_gbps:.0f})\n")
    print("Configs chosen:")
    for r in rows:
        print(f"  {r['N']}x{r['K']} M={r['M']}: {r['configs']}")
    print()
    print("Host time per call at M >= 1024 (us; the GPU times above exclude it):")
    for r in rows:
        if "host_us" in r:
            print(f"  {r['N']}x{r['K']} M={r['M']}: " + ", ".join(f"{a} {fmt_us(t)}" for a, t in r["host_us"].items()))
    print()

    if lookup_rows:
        print("| format | LOOKUP | fused (4096^3) | dx (4096^3) |")
        print("|---|---|---|---|")
        for lr in lookup_rows:
            print(f"| {lr['format']} | {lr['LOOKUP']} | {fmt_us(lr['fused_us'])} | {fmt_us(lr['dx_us'])} |")
        print(f"(fixed tiles: fused {lookup_rows[0]['tile_fused']}, dx {lookup_rows[0]['tile_dx']}; "
              "LOOKUP 0 = global gather, 1 = select tree, 2 = scaled table + tl.gather)\n")

    sweep_rows += [{"N": r["N"], "K": r["K"], "M": r["M"], "fused_us": r["fused_us"],
                    "dequant_cublas_us": r["dequant_cublas_us"], "cublas_us": r["cublas_us"]}
                   for r in rows if r["M"] > max(sweep, default=0) and sweep_rows]
    sweep_rows.sort(key=lambda s: (s["N"], s["K"], s["M"]))
    if sweep_rows:
        print("| N x K | M | fused | deq+cuBLAS | cuBLAS bf16 | faster |")
        print("|---|---|---|---|---|---|")
        for s in sweep_rows:
            f, d = s["fused_us"], s["dequant_cublas_us"]
            faster = "?" if f is None or d is None else ("fused" if f <= d else "deq+cuBLAS")
            print(f"| {s['N']}x{s['K']} | {s['M']} | {fmt_us(f)} | {fmt_us(d)} | {fmt_us(s['cublas_us'])} "
                  f"| {faster} |")
        print()

    checks = []
    for r in rows:
        # Issue 3 states the M = 1 targets at 11008x4096 ("about 12.5 us for 11008x4096") and the
        # fused one "on all three shapes"; see the module docstring.
        decode_shape_of_issue = (r["N"], r["K"]) == (11008, 4096)
        if r["M"] == 4096 and r["fused_vs_cublas"] is not None:
            checks.append({"target": f"fused <= 1.05 x cuBLAS, {r['N']}x{r['K']} M=4096", "issue": True,
                           "value": round(r["fused_vs_cublas"], 3), "ok": r["fused_vs_cublas"] <= 1.05})
        if r["M"] == 1 and r.get("skinny_hbm_pct_measured") is not None:
            checks.append({"target": f"skinny HBM >= 60% of the measured HBM bandwidth, {r['N']}x{r['K']} M=1",
                           "issue": decode_shape_of_issue,
                           "value": f"{r['skinny_hbm_pct_measured']:.0f}% ({r['skinny_hbm_us']:.2f} us; "
                                    f"{r['skinny_hbm_pct_peak']:.0f}% of the peak)",
                           "ok": r["skinny_hbm_pct_measured"] >= 60.0})
            if isinstance(r["bnb_hbm_us"], float):
                speedup = r["bnb_hbm_us"] / r["skinny_hbm_us"]
                checks.append({"target": f"skinny HBM >= 2x bitsandbytes (both in the graph), {r['N']}x{r['K']} M=1",
                               "issue": decode_shape_of_issue,
                               "value": f"{speedup:.2f}x ({r['bnb_hbm_us']:.2f} us; eager matmul_4bit "
                                        f"{fmt_us(r['bnb_matmul_us'])} us)", "ok": speedup >= 2.0})
    for c in checks:
        print(f"{'PASS' if c['ok'] else 'MISS'}  {'issue' if c['issue'] else 'ours '}  {c['target']}: {c['value']}")
    print(f"\ntotal {time.time() - t_start:.0f} s")

    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"env": env, "rows": rows, "sweep": sweep_rows, "lookups": lookup_rows,
                       "checks": checks}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
