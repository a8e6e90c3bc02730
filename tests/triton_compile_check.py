"""Compile every Triton chunk kernel for a CUDA target on a machine without a GPU (Triton's code
generation down to PTX and ptxas's cubin, with the launches' warp counts), so that an error only the
compiler sees (a loop-carried variable whose type changes, an unsupported construct) shows up where
the tests run under ``TRITON_INTERPRET=1``; and read each cubin's resource usage (Triton's own
``cuobjdump -res-usage``): registers per thread, and a register spill (stack or local memory) is a
failure. Run as a script with ``TRITON_INTERPRET`` unset (tests/test_kernels_triton_compile.py
does); exits 1 if a kernel fails to compile or spills.

    python tests/triton_compile_check.py [sm, default 90]
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from tune_losses.kernels import triton_ce_source, triton_terms_source
from tune_losses.kernels.triton_ce import num_warps

_LOGITS = {"z_ptr", "zs_ptr", "zt_ptr"}


def signature(fn, logits_dtype: str, constexprs: dict) -> dict:
    """Argument types by name: logits pointers in ``logits_dtype``, labels int64, strides int64,
    V / ignore_index int32, other pointers and scalars fp32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _LOGITS:
            sig[name] = f"*{logits_dtype}"
        elif name == "labels_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name.startswith("stride"):
            sig[name] = "i64"
        elif name in ("V", "ignore_index"):
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    return sig


def variants():
    """(dtype, name, kernel, constexprs): bf16 with each kernel's main flag sets (every divergence
    alone with a gradient and after the cross-entropy with every option; values only), fp32 with
    the fullest set of each."""
    for dt in ("bf16", "fp32"):
        rb, full_only = dt == "bf16", dt == "fp32"
        sets = [
            (True, False, True, True),
            (False, False, True, False),
            (True, False, False, False),
            (True, True, True, True),
        ]
        for ent, from_lse, wl, wh in sets[: 1 if full_only else 4]:
            flags = dict(
                HAS_ENTROPY=ent,
                FROM_LSE=from_lse,
                HAS_GRAD=wl or wh,
                HAS_W_LP=wl,
                HAS_W_H=wh,
                ROUND_BF16=rb,
                BLOCK=4096,
            )
            name = f"logprob ent={ent} from_lse={from_lse} w_lp={wl} w_h={wh}"
            yield dt, name, triton_terms_source.logprob_kernel, flags
        for code in range(5):
            sets = [(True, True, True, True), (False, False, False, True), (True, False, False, False)]
            for ce, own, opts, grad in sets[: 1 if full_only else (3 if code == 3 else 2)]:
                flags = dict(
                    DIV=code,
                    ONLINE_FKL=code in (0, 2),
                    ONLINE_RKL=code in (1, 2),
                    VALUE_SWEEP=code in (3, 4),
                    HAS_CE=ce,
                    CE_OWN_STATS=own,
                    HAS_SMOOTH=opts,
                    HAS_ZLOSS=opts,
                    HAS_SOFTCAP=opts,
                    HAS_GRAD=grad,
                    TRUE_KL=code != 2,
                    ROUND_BF16=rb,
                    BLOCK=2048,
                )
                name = f"divergence {code} ce={ce} options={opts} grad={grad}"
                yield dt, name, triton_terms_source.divergence_kernel, flags
        for opts in (True, False)[: 1 if full_only else 2]:
            flags = dict(HAS_GRAD=True, HAS_SMOOTH=opts, HAS_ZLOSS=opts, HAS_SOFTCAP=opts, ROUND_BF16=rb, BLOCK=4096)
            yield dt, f"ce options={opts}", triton_ce_source.ce_kernel, flags


# Stack bytes a variant is known to use at its launch's warps under Triton's own ptxas flags
# (`--regAllocOptLevel=2`, Triton 3.9): one register spilled (4 bytes stored and loaded per row
# block) in this variant (benchmarks/results/triton_registers_sm90.md). More, or a spill elsewhere, fails.
KNOWN_STACK = {("bf16", "divergence 2 ce=True options=True grad=True"): 8}


def resource_usage(cubin: bytes, sm: int) -> dict:
    """``{"REG": n, "STACK": bytes, "LOCAL": bytes, ...}`` of the cubin's one kernel, as
    ``cuobjdump -res-usage`` (shipped beside Triton's ptxas) prints them."""
    cuobjdump = os.path.join(os.path.dirname(get_ptxas(sm).path), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    return {k: int(v) for k, v in re.findall(r"([A-Z]+):(\d+)", line)}


def main(sm: int = 90) -> int:
    target = GPUTarget("cuda", sm, 32)
    failed = 0
    for dt, name, fn, flags in variants():
        jf = triton.runtime.jit.JITFunction(fn)
        src = ASTSource(
            jf, signature(jf, dt, flags), constexprs={(jf.arg_names.index(k),): v for k, v in flags.items()}
        )
        warps = num_warps(flags["BLOCK"])
        try:
            kernel = triton.compile(src, target=target, options={"num_warps": warps})
        except Exception as e:  # noqa: BLE001 - report every failing variant
            failed += 1
            print(f"FAILED {dt} {name}: {type(e).__name__}: {e}")
            continue
        use = resource_usage(kernel.asm["cubin"], sm)
        spill = use.get("STACK", 0) + use.get("LOCAL", 0)
        failed += spill > KNOWN_STACK.get((dt, name), 0)
        status = "SPILLS" if spill > KNOWN_STACK.get((dt, name), 0) else "ok    "
        print(f"{status} {dt} {name}: {warps} warps, {use['REG']} registers, stack {use.get('STACK', 0)} B")
    print(f"{failed} failed" if failed else "all compiled, no spill")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
