"""Sweep of the M = 1 decoding kernel's tilings on the LLaMA-7B shapes, in CUDA graphs.

    python3 benchmarks/sweep_gemv.py          (needs CUDA; about a minute on an H100; JSON to $OUT)

Times every (BLOCK_N, BLOCK_K, num_warps, PROGRAMS_PER_SM) with 16-256 codes per thread per step,
checks each result against float32 (relative error < 1e-2), then times the autotuned fused kernel
at M = 4096 against cuBLAS. BENCHMARKS.md's "93 tilings" came from this script's development
version, which also timed a since-dropped 32-bit-word variant of the kernel.
"""
import importlib, json, os, sys, time, itertools
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE)); sys.path.insert(0, HERE)
import torch, triton
from bench_kernels import bench, bench_graph, weight_bytes
import kernels, quant
OUT = os.environ.get("OUT", "/tmp")
dev, dtype = torch.device("cuda"), torch.bfloat16
T0 = time.time()
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
W = {}
gen = torch.Generator(device=dev).manual_seed(0)
for n, k in SHAPES:
    w = (torch.randn(n, k, generator=gen, device=dev) * 0.02).to(dtype)
    qw = quant.quantize_nf4(w, 64, double_quant=True)
    x = torch.randn(1, k, generator=gen, device=dev).to(dtype)
    W[(n, k)] = (w, qw, x, x.float() @ quant.dequantize(qw, torch.float32).t())
def run_cfg(shape, cfg):
    w, qw, x, ref = W[shape]
    try:
        y = kernels.skinny_matmul(x, qw, config=cfg)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        if not err < 1e-2:
            return None
        return round(bench_graph(lambda: kernels.skinny_matmul(x, qw, config=cfg)), 2)
    except Exception as e:
        print("ERR", cfg, type(e).__name__, str(e)[:200]); return None
res = {"bytes": []}
for bn, bk, wp, per in itertools.product([4, 8, 16, 32], [128, 256, 512], [1, 2, 4], [8, 16, 32]):
    codes = bn * bk / (32 * wp)
    if codes < 16 or codes > 256:
        continue
    c = {"BLOCK_N": bn, "BLOCK_K": bk, "LOOKUP": 0, "num_warps": wp, "num_stages": 1, "PROGRAMS_PER_SM": per}
    ts = {f"{s[0]}x{s[1]}": run_cfg(s, c) for s in SHAPES}
    res["bytes"].append((ts, c)); print("B", ts, c, flush=True)
    if time.time() - T0 > 240: break
json.dump(res, open(f"{OUT}/sweep_gemv.json", "w"), indent=1, default=str)
fm = importlib.import_module("kernels.fused_matmul")
res["fused"] = []
for n, k in SHAPES:
    w, qw = W[(n, k)][:2]
    x = torch.randn(4096, k, generator=gen, device=dev).to(dtype)
    tc = bench(lambda: torch.matmul(x, w.t()))
    tf = bench(lambda: kernels.fused_matmul(x, qw))
    res["fused"].append((n, k, tc, tf, tf / tc, str(fm._large_m_tuned.best_config)))
    print("F", res["fused"][-1], flush=True)
json.dump(res, open(f"{OUT}/sweep_gemv.json", "w"), indent=1, default=str)
print("done", time.time() - T0)
