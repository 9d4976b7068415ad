"""Compile block_sparse_attention's Triton kernel for an H100 (sm_90) on a machine without a GPU.

    python tests/kernels/compile_for_h100.py        # one JSON line per launch candidate

Runs in its own process (test_kernel_compiles.py starts it): Triton's interpreter, used by the other
kernel tests, patches triton.language for the rest of a process, and the compiler must not see that.
Strides and alignment are specialised as the JIT does for contiguous bf16 inputs (unit inner strides,
16-aligned pointers), so what compiles here is what a real launch compiles.
"""

import json
import os

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vdit_sparse.kernels import autotune_cache  # noqa: E402
from vdit_sparse.kernels.block_sparse_attention import _block_sparse_fwd  # noqa: E402 - the package shadows the module name

UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_qpn", "stride_kpn",
                "stride_il", "stride_sl", "stride_kos", "stride_cs")
TYPES = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "Stats": "*fp32", "skip": "*u8",
         "qk_scale": "fp32", "heads": "i32", "stats_width": "i32"}
ALL_OPTIONS = dict(HAS_Q_PERM=True, HAS_K_PERM=True, HAS_SKIP=True, EMIT_STATS=True, REVERSE=True)


def signature_of(fn):
    names = fn.arg_names
    constexprs = {names[i] for i in fn.constexprs} | set(UNIT_STRIDES)
    sig = {}
    for n in names:
        if n in constexprs:
            sig[n] = "constexpr"
        elif n in TYPES:
            sig[n] = TYPES[n]
        else:  # plan tensors are int32 pointers, the rest are int strides
            sig[n] = "i32" if n.startswith("stride") else "*i32"
    return sig


def compile_config(fn, cfg, head_dim=128, **options):
    names = fn.arg_names
    sig = signature_of(fn)
    consts = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                  DOT_PRECISION=None, UPCAST_DOT=False, **options, **{n: 1 for n in UNIT_STRIDES})
    aligned = [n for n in names if sig[n].startswith("*") or (n.startswith("stride") and n[-1] in "bhng")]
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    ttgir = kernel.asm["ttgir"]
    return {
        "config": cfg,
        "shared_bytes": kernel.metadata.shared,
        "pipelined_loads": ttgir.count("async_copy_global_to_local"),
        "wgmma": ttgir.count("warp_group_dot") > 0,
    }


def main():
    for cfg in autotune_cache.CANDIDATES:
        print(json.dumps(compile_config(_block_sparse_fwd, cfg, **ALL_OPTIONS)), flush=True)


if __name__ == "__main__":
    main()
