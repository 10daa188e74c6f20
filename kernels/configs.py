"""Launch configurations of the kernels in :mod:`.lora_norms`, in one place.

Policy.  By default every launch takes its configuration from a fixed table,
:func:`fixed_config`, a pure function of the shapes (bucketed), the input dtype
and the ``tl.dot`` input precision.  The tile shape sets the order of the fp32
sums, so a fixed table gives the same bits in every process: a resumed run
scores its rows exactly as the first one did.  Autotuning (choosing among
:func:`autotune_configs` by timing the candidates on the device) is opt-in:
``GRADFILTER_AUTOTUNE=1`` or ``autotune=True`` on a launcher.  Its key holds
the shapes, the bucketed length, the input precision and (added by Triton) the
dtypes of the tensor arguments, so a TF32 choice is never reused for IEEE fp32.
The interpreter never autotunes.

Every configuration here compiles for sm_80 and sm_90 within the shared memory
of a block; the table's entries also compile without register spills for every
dtype and precision (``benchmarks/aot_compile.py`` checks both and fails on a
spill in a table entry).
"""

from __future__ import annotations

import os

import torch
import triton

# Smallest block edge that tl.dot accepts on every target.
MIN_DOT = 16

#: Environment variable that turns autotuning on (``1``, ``true``, ``yes``, ``on``).
AUTOTUNE_ENV = "GRADFILTER_AUTOTUNE"


def autotune_requested() -> bool:
    """Whether ``GRADFILTER_AUTOTUNE`` asks for autotuning (off when unset)."""
    value = os.environ.get(AUTOTUNE_ENV, "0").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{AUTOTUNE_ENV}={value!r}: expected 1 (autotune) or 0 (fixed table)")


def pow2_clamp(x: int, lo: int, hi: int) -> int:
    """``next_power_of_2(x)`` clamped to ``[lo, hi]``."""
    return max(lo, min(hi, triton.next_power_of_2(max(1, int(x)))))


def canonical_route(route: str) -> str:
    if route == "direct":
        return "direct"
    if route in ("ghost", "gram"):
        return "ghost"
    raise ValueError(f"unknown route {route!r}; expected 'direct' or 'ghost' (alias 'gram')")


def precision_of(dtype: torch.dtype, allow_tf32: bool) -> str:
    """The ``tl.dot`` input precision the launchers pass for ``dtype``."""
    return "tf32" if (dtype == torch.float32 and allow_tf32) else "ieee"


# ----------------------------------------------------------------------------
# The fixed table
# ----------------------------------------------------------------------------

# The table: per kernel and kind of input, bucket -> (BLOCK_T or BLOCK_K, warps,
# stages) where it differs from the default (BLOCK_T = 32 for the tile kernels,
# 4 warps, 3 stages).  Kinds: "fp32" (IEEE fp32: FMA, no tensor cores, the
# register-hungry one), "tc32" (fp32 through TF32 tensor cores), "half" (fp16
# and bf16).  Entries come from the spill report of benchmarks/aot_compile.py
# for sm_90 (see docs/gpu.md): a configuration that spills takes more warps
# (fewer registers per thread for the same tile) or fewer stages.
_TILE_DEFAULT = (32, 4, 3)
_TABLE: dict[str, dict[str, dict[tuple[int, int], tuple[int, int, int]]]] = {
    # (BLOCK_A, BLOCK_B) -> (BLOCK_T, warps, stages); no entry spills at the default
    "direct": {"fp32": {}, "tc32": {}, "half": {}},
    # the training op keeps two accumulators (the example's tile and the sum)
    "fused": {
        "fp32": {(32, 64): (32, 8, 3), (64, 32): (32, 8, 3), (64, 64): (16, 4, 3)},
        "tc32": {},
        "half": {},
    },
    # (BLOCK_T, BLOCK_K) -> (BLOCK_K, warps, stages): two BLOCK_T x BLOCK_T
    # accumulators and four operand tiles per step
    "ghost": {
        "fp32": {
            (32, 64): (64, 8, 3),
            (64, 16): (16, 8, 3),
            (64, 32): (32, 8, 3),
            (64, 64): (32, 8, 3),
        },
        "tc32": {(32, 64): (64, 8, 3), (64, 64): (64, 8, 3)},
        "half": {(64, 64): (64, 8, 3)},
    },
}
KERNELS = ("direct", "fused", "ghost")


def _kind(dtype: torch.dtype, precision: str) -> str:
    if dtype == torch.float32:
        return "tc32" if precision == "tf32" else "fp32"
    if dtype in (torch.float16, torch.bfloat16):
        return "half"
    raise TypeError(f"no kernel configuration for {dtype}")


def _kernel_name(kernel: str) -> str:
    name = "ghost" if kernel == "gram" else kernel
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
    return name


def fixed_config(
    kernel: str,
    a: int,
    b: int,
    max_len: int,
    dtype: torch.dtype = torch.float32,
    precision: str = "ieee",
) -> triton.Config:
    """The configuration of a launch without autotuning (the default).

    kernel: ``"direct"`` (norms, direct route), ``"fused"`` (the training op) or
    ``"ghost"`` (alias ``"gram"``).  direct and fused: ``BLOCK_A =
    clamp(next_pow2(a), 16, 64)``, ``BLOCK_B = clamp(next_pow2(b), 16, 64)``;
    ghost: ``BLOCK_T = clamp(next_pow2(max_len), 16, 64)``, ``BLOCK_K =
    clamp(next_pow2(max(a, b)), 16, 64)``.  The rest (``BLOCK_T`` of the tile
    kernels, a smaller ``BLOCK_K``, warps, stages) from the table above for the
    kind of input.  Every edge is at least 16 (``tl.dot``) and no larger than
    the data needs, so small ``a``, ``b`` or ``n`` waste little.  A pure
    function of its arguments: the same shapes, dtype and precision always get
    the same configuration, whatever the device, the process or its history.
    """
    name = _kernel_name(kernel)
    entries = _TABLE[name][_kind(dtype, precision)]
    if name == "ghost":
        bt, bk = pow2_clamp(max_len, MIN_DOT, 64), pow2_clamp(max(a, b), MIN_DOT, 64)
        bk_used, warps, stages = entries.get((bt, bk), (bk, 4, 3))
        return triton.Config(
            {"BLOCK_T": bt, "BLOCK_K": bk_used}, num_warps=warps, num_stages=stages
        )
    ba, bb = pow2_clamp(a, MIN_DOT, 64), pow2_clamp(b, MIN_DOT, 64)
    bt, warps, stages = entries.get((ba, bb), _TILE_DEFAULT)
    return triton.Config(
        {"BLOCK_A": ba, "BLOCK_B": bb, "BLOCK_T": bt}, num_warps=warps, num_stages=stages
    )


def table_configs(kernel: str, dtype: torch.dtype, precision: str) -> list[triton.Config]:
    """Every configuration :func:`fixed_config` can return for one kernel, dtype and
    precision (what the compile check must see compile without spills)."""
    edges = (16, 32, 64)
    shapes = [(a, b, n) for a in edges for b in edges for n in edges]
    return [fixed_config(kernel, a, b, n, dtype, precision) for a, b, n in shapes]


# ----------------------------------------------------------------------------
# Autotuning (opt-in)
# ----------------------------------------------------------------------------


def autotune_configs(route: str = "direct") -> list[triton.Config]:
    """Candidate configurations for Hopper (H100 / H200) of one route.

    direct (``BLOCK_A, BLOCK_B, BLOCK_T``): narrow-by-wide tiles for LoRA A
    (``a = r``) and wide-by-narrow ones for LoRA B (``b = r``), square ones for
    dense layers; 4 warps for tiles up to 64 x 128, 8 above; 3-4 stages
    (the T loop is a K loop for ``tl.dot``).  Configs whose tile exceeds the
    next power of two of ``a`` or ``b`` are pruned at launch.

    ghost (``BLOCK_T, BLOCK_K``): two fp32 ``BLOCK_T x BLOCK_T`` accumulators
    per program, so 8 warps for ``BLOCK_T >= 64``; long ``BLOCK_K`` steps for
    the reduction over the wide feature dimension.
    """
    route = canonical_route(route)
    if route == "direct":
        shapes = [
            # BLOCK_A, BLOCK_B, BLOCK_T, warps, stages
            (16, 64, 64, 4, 4),
            (16, 128, 64, 4, 4),
            (64, 16, 64, 4, 4),
            (128, 16, 64, 4, 4),
            (32, 128, 64, 4, 3),
            (128, 32, 64, 4, 3),
            (64, 64, 64, 4, 3),
            (64, 64, 128, 4, 3),  # 4 stages need 256 KB of shared memory in tf32
            (64, 128, 64, 4, 3),
            (128, 64, 64, 4, 3),
            (128, 128, 32, 8, 3),
            (128, 128, 64, 8, 3),
        ]
        return [
            triton.Config({"BLOCK_A": ba, "BLOCK_B": bb, "BLOCK_T": bt}, num_warps=w, num_stages=s)
            for ba, bb, bt, w, s in shapes
        ]
    shapes = [
        # BLOCK_T, BLOCK_K, warps, stages
        (16, 64, 4, 3),
        (16, 128, 4, 3),
        (32, 64, 4, 3),
        (32, 128, 4, 3),
        (64, 64, 8, 3),
        (64, 128, 8, 3),
        (128, 32, 8, 3),
        (128, 64, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_T": bt, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bt, bk, w, s in shapes
    ]


def prune_direct(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles wider than the next power of two of ``a`` / ``b`` (keep one at least)."""
    cap_a = pow2_clamp(named_args["a"], MIN_DOT, 1 << 30)
    cap_b = pow2_clamp(named_args["b"], MIN_DOT, 1 << 30)
    kept = [c for c in configs if c.kwargs["BLOCK_A"] <= cap_a and c.kwargs["BLOCK_B"] <= cap_b]
    if kept:
        return kept
    smallest = min(configs, key=lambda c: c.kwargs["BLOCK_A"] * c.kwargs["BLOCK_B"])
    return [smallest]


def prune_gram(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop row blocks longer than the next power of two of the longest example."""
    cap_t = pow2_clamp(named_args["max_len"], MIN_DOT, 1 << 30)
    cap_k = pow2_clamp(max(named_args["a"], named_args["b"]), MIN_DOT, 1 << 30)
    kept = [c for c in configs if c.kwargs["BLOCK_T"] <= cap_t and c.kwargs["BLOCK_K"] <= cap_k]
    if kept:
        return kept
    return [min(configs, key=lambda c: (c.kwargs["BLOCK_T"], c.kwargs["BLOCK_K"]))]


#: Autotune keys per kernel: every argument the best configuration may depend
#: on.  ``INPUT_PRECISION`` is one (IEEE and TF32 fp32 differ in speed and in
#: bits); Triton adds the dtypes of the tensor arguments itself.
AUTOTUNE_KEYS = {
    "direct": ["a", "b", "len_bucket", "SPLIT_T", "INPUT_PRECISION"],
    "fused": ["a", "b", "len_bucket", "INPUT_PRECISION"],
    "ghost": ["a", "b", "len_bucket", "INPUT_PRECISION"],
}
