"""Write tests/data/bitsandbytes_nf4_reference.json with bitsandbytes (CPU): its signed 8-bit
dynamic map, and quantize_4bit (NF4, blocks of 64) of two fixed weights:
  plain: 32 x 256, compress_statistics=False (float32 absmax);
  dq:    1 x 20480 (320 blocks: 2 second-level blocks of 256), compress_statistics=True (one row:
         bitsandbytes' second-level blocks are then ours).
Per weight: packed bytes, absmax (floats or codes), nested absmax and offset, and the float32
dequantize_4bit output (its first 64 values, and the SHA-256 of all of it).

    python tests/data/make_bitsandbytes_reference.py tests/data/bitsandbytes_nf4_reference.json

needs bitsandbytes with its native CPU library (libbitsandbytes_cpu.so) moved out of the package,
so that it runs its PyTorch kernels (tests/data/README.md says why)."""

import hashlib
import json
import sys

import bitsandbytes
import bitsandbytes.cextension
import bitsandbytes.functional as bf
import numpy as np
import torch


def case(seed, shape, dq):
    """One weight through quantize_4bit and dequantize_4bit (dq: double quantization)."""
    w = torch.from_numpy((np.random.RandomState(seed).standard_normal(shape) * 0.05).astype(np.float32))
    q, st = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
    d = bf.dequantize_4bit(q, st).float().contiguous()
    out = {"weight": f"numpy.random.RandomState({seed}).standard_normal({shape}) * 0.05, as float32",
           "compress_statistics": dq, "packed_hex": q.view(-1).numpy().tobytes().hex(),
           "dequantized_first": [float(v) for v in d.view(-1)[:64].tolist()],
           "dequantized_sha256": hashlib.sha256(d.numpy().tobytes()).hexdigest()}
    if dq:
        out.update(absmax_codes_hex=st.absmax.view(-1).numpy().tobytes().hex(),
                   nested_absmax=[float(v) for v in st.state2.absmax.tolist()],
                   nested_blocksize=st.state2.blocksize, offset=float(st.offset))
    else:
        out["absmax"] = [float(v) for v in st.absmax.tolist()]
    return out


assert type(bitsandbytes.cextension.lib).__name__ == "ErrorHandlerMockBNBNativeLibrary", \
    "move libbitsandbytes_cpu.so out of the bitsandbytes package first (the module docstring)"
ref = {"source": f"bitsandbytes {bitsandbytes.__version__} on the CPU (its PyTorch kernels), torch {torch.__version__}, "
                 f"numpy {np.__version__}",
       "blocksize": 64,
       "dynamic_map_signed": [float(v) for v in bf.create_dynamic_map(signed=True).tolist()],
       "plain": case(0, (32, 256), False), "dq": case(1, (1, 20480), True)}
with open(sys.argv[1], "w") as f:
    json.dump(ref, f)
print(ref["source"])
