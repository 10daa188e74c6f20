"""Ahead-of-time compile check of the Triton kernels in ``kernels/lora_norms.py``.

Compiles every ``@triton.jit`` kernel with every configuration the launchers can
use (every entry of the fixed table, :func:`table_configs`, and the
:func:`autotune_configs` of each route), for each input dtype and
``INPUT_PRECISION`` the launchers pass, for a CUDA target given by ``--arch``.
No GPU is needed: Triton compiles down to a cubin with its bundled ``ptxas``.

One line per kernel/config: shared memory (``metadata.shared``), registers and
spills (from the ``ptxas -v`` log); ``table`` marks the configurations used by
default.  Exit 1 on a compile error, on shared memory above the target's
per-block limit, or on any spill in a table configuration; spills of the
opt-in autotune candidates are reported, and fail only above
``--max-spill-bytes`` when that is positive.

    python benchmarks/aot_compile.py --arch 90 --jobs 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

# Kernels decorated in interpreter mode cannot be compiled: drop the request
# before Triton or the kernels are imported in this process.
os.environ.pop("TRITON_INTERPRET", None)
_MODULE = "gradfilter.kernels.lora_norms"

# Largest dynamic shared memory one block may use, per compute capability.
SHARED_LIMIT = {80: 166912, 90: 232448}
DTYPES = {"fp32": ("ieee", "tf32"), "fp16": ("ieee",), "bf16": ("ieee",)}
_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _kernels_module():
    loaded = sys.modules.get(_MODULE)
    if loaded is not None and loaded.interpreted():
        sys.exit(
            f"{_MODULE} was imported with TRITON_INTERPRET set; its kernels are interpreter "
            "functions and cannot be compiled. Run this check in a fresh process without it."
        )
    import importlib

    module = importlib.import_module(_MODULE)
    if module.interpreted():
        sys.exit(f"{_MODULE} loaded in interpreter mode; unset TRITON_INTERPRET and rerun")
    return module


def _configs(table_name: str, route: str, dtype: str, prec: str) -> list[tuple]:
    """(config key, in the table) for the table's configs of one kernel, dtype and
    precision, then the autotune candidates of its route, without repeats."""
    import torch

    from gradfilter.kernels import configs

    table = configs.table_configs(table_name, getattr(torch, _TORCH_DTYPES[dtype]), prec)
    seen, out = {}, []
    for cfg, in_table in [(c, True) for c in table] + [
        (c, False) for c in configs.autotune_configs(route)
    ]:
        key = (tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages)
        if key not in seen:
            seen[key] = len(out)
            out.append((key, in_table))
    return out


def jobs() -> list[tuple]:
    """(kernel name, dtype, precision, extra constexprs, config key, in the table) of
    every compile."""
    _kernels_module()
    plan = [
        # kernel, its table, its autotune candidates, extra constexprs
        (
            "_outer_sq_norm_direct_kernel",
            "direct",
            "direct",
            [{"SPLIT_T": False}, {"SPLIT_T": True}],
        ),
        ("_outer_grad_sq_norm_kernel", "fused", "direct", [{}]),
        ("_outer_sq_norm_gram_kernel", "ghost", "ghost", [{}]),
    ]
    out = []
    for name, table_name, route, extras in plan:
        for dtype, precisions in DTYPES.items():
            for prec in precisions:
                for cfg, in_table in _configs(table_name, route, dtype, prec):
                    for extra in extras:
                        out.append((name, dtype, prec, tuple(extra.items()), cfg, in_table))
    return out


def _ptxas_numbers(log: str) -> tuple[int | None, int | None]:
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", log)
    return (
        int(regs.group(1)) if regs else None,
        sum(int(s) for s in spills) if spills else None,
    )


def compile_one(job: tuple, arch: int) -> dict:
    """Compile one kernel/config for ``sm_<arch>``; a dict with the numbers or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    m = _kernels_module()
    name, dtype, prec, extra, (meta, warps, stages), in_table = job
    kernel = getattr(m, name)
    # Launch-time view of contiguous inputs: 16-byte aligned pointers, unit
    # feature strides (specialized to 1 by the JIT), other ints as i32.
    pointers = [arg for arg in kernel.arg_names if arg.endswith("_ptr")]
    sig = {arg: ("*fp32" if arg in pointers else "i32") for arg in kernel.arg_names}
    sig.update(left_ptr=f"*{dtype}", right_ptr=f"*{dtype}", start_ptr="*i64", end_ptr="*i64")
    if "group_ptr" in sig:
        sig["group_ptr"] = "*i64"
    consts = {**dict(meta), **dict(extra), "INPUT_PRECISION": prec, "stride_la": 1, "stride_rb": 1}
    sig.update({c: "constexpr" for c in consts})
    # end_ptr is cu_seqlens[1:] for packed rows: 8-byte aligned only.
    aligned = [p for p in pointers if p != "end_ptr"]
    attrs = {(kernel.arg_names.index(p),): [["tt.divisibility", 16]] for p in aligned}
    triton.knobs.compilation.always_compile = True  # the ptxas log is only written on a build
    triton.knobs.nvidia.dump_ptxas_log = True
    label = (
        " ".join(
            [name, dtype, prec, *(f"{k}={v}" for k, v in extra), *(f"{k}={v}" for k, v in meta)]
        )
        + f" w={warps} s={stages}"
        + (" table" if in_table else "")
    )
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(kernel, sig, consts, attrs),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": warps, "num_stages": stages},
            )
    except Exception as exc:  # noqa: BLE001 - every compile failure is reported
        first = str(exc).strip().splitlines()[:3]
        return {
            "label": label,
            "table": in_table,
            "error": f"{type(exc).__name__}: {' | '.join(first)}",
        }
    regs, spills = _ptxas_numbers(log.getvalue())
    regs = getattr(compiled, "n_regs", None) or regs
    spills = getattr(compiled, "n_spills", None) or spills
    seconds = time.perf_counter() - start
    return {
        "label": label,
        "table": in_table,
        "shared": compiled.metadata.shared,
        "regs": regs,
        "spills": spills,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT))
    parser.add_argument(
        "--max-spill-bytes",
        type=int,
        default=0,
        help="fail when an autotune candidate spills more than this (0: report only); "
        "a table configuration fails on any spill",
    )
    parser.add_argument("--jobs", type=int, default=1, help="parallel compile processes")
    parser.add_argument("--kernel", action="append", help="only kernels containing this text")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES))
    args = parser.parse_args(argv)

    todo = [
        j
        for j in jobs()
        if (not args.kernel or any(k in j[0] for k in args.kernel))
        and (not args.dtype or j[1] in args.dtype)
    ]
    limit = SHARED_LIMIT[args.arch]
    print(f"sm_{args.arch}: {len(todo)} kernel/config pairs, shared limit {limit} bytes")
    start = time.perf_counter()
    failures, spilling, table_spilling = [], [], []
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for r in pool.map(compile_one, todo, [args.arch] * len(todo)):
            if "error" in r:
                failures.append(r["label"])
                print(f"ERROR  {r['label']}: {r['error']}", flush=True)
                continue
            status = "ok"
            if r["shared"] > limit:
                status = "SHARED"
                failures.append(r["label"])
            if r["spills"]:
                spilling.append(r["label"])
                over = args.max_spill_bytes > 0 and r["spills"] > args.max_spill_bytes
                if r["table"] or over:
                    status = "SPILL"
                    failures.append(r["label"])
                if r["table"]:
                    table_spilling.append(r["label"])
            print(
                f"{status:6} {r['label']}: shared={r['shared']} regs={r['regs']} "
                f"spills={r['spills']} ({r['seconds']:.1f}s)",
                flush=True,
            )
    wall = time.perf_counter() - start
    n_table = sum(1 for j in todo if j[-1])
    print(
        f"{len(todo)} compiled in {wall:.0f}s; {len(failures)} failing, {len(spilling)} spilling "
        f"({len(table_spilling)} of the {n_table} table configurations)"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
