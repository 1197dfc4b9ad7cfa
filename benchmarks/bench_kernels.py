"""Benchmark of the 4-bit kernels on LLaMA-7B linear shapes, against cuBLAS bf16 and bitsandbytes.

    python3 benchmarks/bench_kernels.py --out kernels.json

For (N, K) in (4096, 4096), (11008, 4096), (4096, 11008) (y = x @ W.T, W is N x K: q/o, gate/up,
down projections) and M in 1, 16, 4096 tokens it times, in one run, with
triton.testing.do_bench (median, fresh random bf16 inputs, never zeros):
    cublas        torch.matmul(x, W_bf16.T)                    (the 16-bit baseline)
    fused         kernels.fused_matmul(x, W_nf4)               (dequantized on chip)
    skinny        kernels.skinny_matmul(x, W_nf4)              (M <= 16)
    deq+cublas    x @ kernels.dequantize(W_nf4).T              (the alternative for large M)
    dispatch      quant._matmul: what QuantLinear runs at this M
    dequant       kernels.dequantize(W_nf4, bf16)              (independent of M)
    dx            kernels.fused_matmul_dx(dy, W_nf4)           (backward, dy is M x N)
    cublas dx     dy @ W_bf16
    bnb           bitsandbytes.matmul_4bit and bnb dequantize_4bit (if bitsandbytes imports),
                  NF4, block 64, double quantization (compress_statistics), as QLoRA uses it.
Our weight: quant.quantize_nf4 with double quantization (4.127 bits per weight).
Then a sweep of M for fused vs deq+cublas, to set quant.DEQUANT_MATMUL_MIN_M.

Prints markdown tables and checks the targets (fused <= 1.05 x cuBLAS at M = 4096; skinny at
M = 1 >= 60% of HBM bandwidth, --hbm-gbps, default 3350 GB/s for the H100 SXM); writes JSON to
--out. Needs CUDA. Autotuning happens during the first (warm-up) calls and is not timed.
"""

import argparse
import importlib
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


def bench(fn):
    """Median time of fn() in microseconds."""
    import triton.testing

    fn()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    q = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return 1000.0 * (q[0] if isinstance(q, (list, tuple)) else q)


def best_config(module_name, attr):
    """The config the autotuner last used for kernels.<module>.<attr>, as a string."""
    tuner = getattr(importlib.import_module(f"kernels.{module_name}"), attr)
    cfg = getattr(tuner, "best_config", None)
    return None if cfg is None else str(cfg)


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
    return "-" if v is None else f"{v:.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the results as JSON to this path")
    ap.add_argument("--ms", default="1,16,4096", help="token counts M, comma-separated")
    ap.add_argument("--sweep", default="64,128,256,512,1024,2048",
                    help="M values for the fused vs dequantize+cuBLAS sweep ('' to skip)")
    ap.add_argument("--hbm-gbps", type=float, default=3350.0, help="peak HBM bandwidth (GB/s)")
    ap.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")

    import triton

    import kernels
    import quant

    ms = [int(m) for m in args.ms.split(",") if m]
    sweep = [int(m) for m in args.sweep.split(",") if m]
    bnb, bnb_note = (None, "bitsandbytes skipped (--no-bnb)") if args.no_bnb else load_bnb()
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32) * scale).to(dtype)

    env = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "bitsandbytes": bnb_note,
        "SKINNY_MAX_M": quant.SKINNY_MAX_M, "DEQUANT_MATMUL_MIN_M": quant.DEQUANT_MATMUL_MIN_M,
    }
    print(f"# 4-bit kernels: {env['gpu']}, torch {env['torch']}, triton {env['triton']}; {bnb_note}\n")

    rows, sweep_rows = [], []
    for n, k in SHAPES:
        w = randn(n, k, scale=0.02)
        qw = quant.quantize_nf4(w, 64, double_quant=True)
        wq_bytes = weight_bytes(qw)
        t_dequant = bench(lambda: kernels.dequantize(qw, dtype))
        cfg_dequant = best_config("dequantize", "_dequantize_tuned")
        bnb_w = None
        if bnb is not None:
            _, bf = bnb
            packed_bnb, state_bnb = bf.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                     compress_statistics=True)
            bnb_w = (packed_bnb, state_bnb)
            t_bnb_dequant = bench(lambda: bf.dequantize_4bit(packed_bnb, state_bnb))
        for m in ms:
            x = randn(m, k)
            dy = randn(m, n)
            r = {"N": n, "K": k, "M": m, "weight_bytes": wq_bytes, "configs": {}}
            r["cublas_us"] = bench(lambda: torch.matmul(x, w.t()))
            r["fused_us"] = bench(lambda: kernels.fused_matmul(x, qw))
            r["configs"]["fused"] = best_config("fused_matmul", "_large_m_tuned" if m > 128 else "_small_m_tuned")
            r["skinny_us"] = None
            if m <= 16:
                r["skinny_us"] = bench(lambda: kernels.skinny_matmul(x, qw))
                r["configs"]["skinny"] = best_config("skinny_matmul", "_m1_tuned" if m == 1 else "_m16_tuned")
                moved = wq_bytes + x.numel() * 2 + m * n * 2
                r["skinny_hbm_pct"] = 100.0 * moved / (r["skinny_us"] * 1e-6) / (args.hbm_gbps * 1e9)
            r["dequant_cublas_us"] = bench(lambda: torch.matmul(x, kernels.dequantize(qw, dtype).t()))
            r["dispatch_us"] = bench(lambda: quant._matmul(x, qw))
            r["dequant_us"] = t_dequant
            r["configs"]["dequant"] = cfg_dequant
            r["dx_us"] = bench(lambda: kernels.fused_matmul_dx(dy, qw))
            r["configs"]["dx"] = best_config("fused_matmul_dx", "_large_m_tuned" if m > 128 else "_small_m_tuned")
            r["cublas_dx_us"] = bench(lambda: torch.matmul(dy, w))
            r["bnb_matmul_us"] = r["bnb_dequant_us"] = None
            if bnb_w is not None:
                lib = bnb[0]
                packed_bnb, state_bnb = bnb_w
                r["bnb_matmul_us"] = bench(lambda: lib.matmul_4bit(x, packed_bnb.t(), quant_state=state_bnb))
                r["bnb_dequant_us"] = t_bnb_dequant
            r["fused_vs_cublas"] = r["fused_us"] / r["cublas_us"]
            rows.append(r)
            print(f"  measured N={n} K={k} M={m}", file=sys.stderr)
        for m in sweep:
            x = randn(m, k)
            sweep_rows.append({
                "N": n, "K": k, "M": m,
                "fused_us": bench(lambda: kernels.fused_matmul(x, qw)),
                "dequant_cublas_us": bench(lambda: torch.matmul(x, kernels.dequantize(qw, dtype).t())),
                "cublas_us": bench(lambda: torch.matmul(x, w.t())),
            })

    print("| N x K | M | cuBLAS bf16 | fused | skinny | deq+cuBLAS | dispatch | dequant | dx | cuBLAS dx "
          "| bnb matmul | bnb dequant | fused/cuBLAS | skinny % HBM |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        hbm = f"{r['skinny_hbm_pct']:.0f}%" if r.get("skinny_hbm_pct") else "-"
        print(f"| {r['N']}x{r['K']} | {r['M']} | {fmt_us(r['cublas_us'])} | {fmt_us(r['fused_us'])} "
              f"| {fmt_us(r['skinny_us'])} | {fmt_us(r['dequant_cublas_us'])} | {fmt_us(r['dispatch_us'])} "
              f"| {fmt_us(r['dequant_us'])} | {fmt_us(r['dx_us'])} | {fmt_us(r['cublas_dx_us'])} "
              f"| {fmt_us(r['bnb_matmul_us'])} | {fmt_us(r['bnb_dequant_us'])} | {r['fused_vs_cublas']:.2f} | {hbm} |")
    print("\n(times in microseconds, median of do_bench)\n")

    if sweep_rows:
        print("| N x K | M | fused | deq+cuBLAS | cuBLAS bf16 | faster |")
        print("|---|---|---|---|---|---|")
        for s in sweep_rows:
            faster = "fused" if s["fused_us"] <= s["dequant_cublas_us"] else "deq+cuBLAS"
            print(f"| {s['N']}x{s['K']} | {s['M']} | {s['fused_us']:.1f} | {s['dequant_cublas_us']:.1f} "
                  f"| {s['cublas_us']:.1f} | {faster} |")
        print()

    checks = []
    for r in rows:
        if r["M"] == 4096:
            checks.append({"target": f"fused <= 1.05 x cuBLAS, {r['N']}x{r['K']} M=4096",
                           "value": round(r["fused_vs_cublas"], 3), "ok": r["fused_vs_cublas"] <= 1.05})
        if r["M"] == 1 and r.get("skinny_hbm_pct") is not None:
            checks.append({"target": f"skinny >= 60% HBM, {r['N']}x{r['K']} M=1",
                           "value": f"{r['skinny_hbm_pct']:.0f}% ({r['skinny_us']:.1f} us)",
                           "ok": r["skinny_hbm_pct"] >= 60.0})
    for c in checks:
        print(f"{'PASS' if c['ok'] else 'MISS'}  {c['target']}: {c['value']}")

    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"env": env, "rows": rows, "sweep": sweep_rows, "checks": checks}, f, indent=1)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
