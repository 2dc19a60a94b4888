"""Splash attention's mask metadata for the SPAttention masks: how much, and whether it fits SMEM.

Splash prefetches three int arrays per pallas call (``data_next``, ``block_mask``, ``mask_next``) into
scalar memory (SMEM: 1 MiB per TensorCore on TPU v4 / v5e / v5p / v6e, ``pltpu`` ``TpuInfo``). With
one distinct mask per head they have ``heads x q-blocks x kv-blocks`` entries, each downcast to the
smallest int type that holds its largest value. ``partial_mask_blocks`` (bool blocks, deduplicated)
live in HBM and are DMAed to VMEM per block.

Two layouts, for ``H`` heads on one device (``head_shards = 1``):

* **one kernel**: one ``MultiHeadMask`` of the ``H`` head masks (what ``implementation="splash"``
  builds when it fits ``DEFAULT_SMEM_BUDGET``). Under ``t`` head shards a device holds ``1/t`` of it.
* **per-head kernels** (``heads_per_call=1``): one kernel per head. A single mask per kernel lets
  splash compute the mask in the kernel (no ``mask_next``, no partial blocks) and shrink the grid to
  the visited kv blocks, so SMEM holds ``q-blocks x max visited kv-blocks`` entries.

Sizes are *measured* from the ``MaskInfo`` that ``make_splash_mha`` builds when the grid has at most
``--measure-limit`` entries, and otherwise computed by :func:`analytic`, which counts the same
arrays from the block classification (band masks are Toeplitz, so a block depends only on its
diagonal). Where both exist they must agree; the script checks it.

Usage::

    python bench/splash_metadata.py                       # H=16, N=8k/32k/128k, blocks 512, 1024, 128
    python bench/splash_metadata.py --lengths 8192 --blocks 512

Writes ``bench/results/splash_metadata.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import time
import warnings

import jax
import numpy as np

from spattn_jax import masks
from spattn_jax.kernels import splash

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
PASSES = ("fwd", "dq", "dkv")


def _int_bytes(max_value: int) -> int:
    """Bytes of the int type splash downcasts an array with this maximum to."""
    return 1 if max_value <= 127 else 2 if max_value <= 32767 else 4


# -- measured --------------------------------------------------------------------------------------


def measured(spec: masks.MaskSpec, n: int, block: int, heads_per_call: int) -> dict:
    """Sizes read off the kernels ``implementation="splash"`` builds (no head sharding)."""
    sizes = splash.block_sizes_for(block, n, n, interpret=False)
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # the SMEM warning: reporting the overflow is the point here
        warnings.simplefilter("ignore")
        kernels, _ = splash.build_kernels(spec, n, n, sizes, 1, heads_per_call, False)
    seconds = time.perf_counter() - t0
    infos = [splash.mask_info_bytes(kern) for kern in kernels]
    fwd = kernels[0].fwd_mask_info
    return dict(
        smem_per_call=max(splash.smem_bytes(kern) for kern in kernels),
        total_bytes=sum(sum(sum(f.values()) for f in info.values()) for info in infos),
        partial_blocks=0 if fwd.partial_mask_blocks is None else int(fwd.partial_mask_blocks.shape[0]),
        fwd_shape=list(fwd.block_mask.shape),
        fwd_dtypes={k: str(getattr(fwd, k).dtype) for k in ("data_next", "block_mask", "mask_next") if getattr(fwd, k) is not None},
        build_seconds=round(seconds, 2),
    )


# -- analytic --------------------------------------------------------------------------------------


def _diagonals(ivs, n: int, block: int) -> np.ndarray:
    """Block kind (splash's ``block_mask`` value) per block diagonal ``delta = q-block - kv-block``
    in ``[0, n)``; blocks with ``delta < 0`` hold negative distances only, so they are empty."""
    return np.array([splash.block_kind(ivs, d * block, block, block) for d in range(n)], np.int8)


def analytic(spec: masks.MaskSpec, n_tokens: int, block: int) -> dict:
    """The measured fields for both layouts, counted instead of built (square blocks, N a block
    multiple, one device)."""
    assert n_tokens % block == 0
    n = n_tokens // block  # q-blocks = kv-blocks
    ivs = spec.intervals(n_tokens)
    kinds = [_diagonals(iv, n, block) for iv in ivs]
    # Partial blocks deduplicate by content across heads and diagonals.
    partial = {
        splash.distance_block(iv, d * block, block, block).tobytes()
        for iv, kind in zip(ivs, kinds)
        for d in np.flatnonzero(kind == splash.PARTIAL)
    }
    num_partial = len(partial)
    nonempty = [np.flatnonzero(kind) for kind in kinds]
    first = min(int(d[0]) for d in nonempty if d.size)
    # data_next holds the kv index (fwd, dq) or the q index (dkv) of visited blocks; the largest kv
    # index is on the nearest nonempty diagonal of the last q-block row.
    dn_fwd, dn_dkv = _int_bytes(n - 1 - first), _int_bytes(n - 1)
    heads = spec.num_heads
    entries = heads * n * n
    mask_next = _int_bytes(num_partial - 1) if num_partial else 0
    per_pass = {
        "fwd": entries * (dn_fwd + 1 + mask_next),
        "dq": entries * (dn_fwd + 1 + mask_next),
        "dkv": entries * (dn_dkv + 1 + mask_next),
    }
    one = dict(
        smem_per_call=max(per_pass.values()),
        total_bytes=sum(per_pass.values()) + 3 * num_partial * block * block,
        partial_blocks=num_partial,
        fwd_shape=[heads, n, n],
    )
    # Per-head kernels: one mask each, so the grid shrinks to the visited blocks of the widest row
    # (fwd, dq) or column (dkv); the last row and the first column see every nonempty diagonal.
    smem, total = 0, 0
    for d in nonempty:
        width = int(d.size)
        if not width:
            continue
        j_max = n - 1 - int(d[0])
        per_head = {
            "fwd": n * width * (_int_bytes(j_max) + 1),
            "dq": n * width * (_int_bytes(j_max) + 1),
            "dkv": n * width * (_int_bytes(n - 1) + 1),
        }
        smem = max(smem, max(per_head.values()))
        total += sum(per_head.values()) + 3 * 4 * n_tokens  # + int32 q_sequence per pass
    return dict(one_kernel=one, per_head=dict(smem_per_call=smem, total_bytes=total))


# -- report ----------------------------------------------------------------------------------------


def run(lengths, blocks, variants, heads: int, measure_limit: int) -> list[dict]:
    rows = []
    for n in lengths:
        for block in blocks:
            for variant in variants:
                spec = masks.make(variant, num_heads=heads, band_len=None)
                entries = heads * (n // block) ** 2
                calc = analytic(spec, n, block)
                row = dict(n=n, variant=variant, block=block, heads=heads, entries=entries)
                if entries <= measure_limit:
                    one = measured(spec, n, block, heads)
                    per_head = measured(spec, n, block, 1)
                    for key in ("smem_per_call", "total_bytes", "partial_blocks", "fwd_shape"):
                        assert one[key] == calc["one_kernel"][key], (n, block, variant, key, one, calc)
                    for key in ("smem_per_call", "total_bytes"):
                        assert per_head[key] == calc["per_head"][key], (n, block, variant, key, per_head, calc)
                    row.update(source="measured (= analytic)", one_kernel=one, per_head=per_head)
                else:
                    row.update(source="analytic", **calc)
                # "Fits" means within the budget implementation="splash" plans with (3/4 of the 1 MiB
                # of SMEM; the rest is for the sink table and the compiler's own scalars).
                one_smem = row["one_kernel"]["smem_per_call"]
                row["one_kernel_fits"] = one_smem <= splash.DEFAULT_SMEM_BUDGET
                # Fewest head shards (a divisor of H) that bring one device's share within the budget.
                row["head_shards_to_fit"] = next(
                    (t for t in range(1, heads + 1) if heads % t == 0 and one_smem / t <= splash.DEFAULT_SMEM_BUDGET),
                    None,
                )
                row["per_head_fits"] = row["per_head"]["smem_per_call"] <= splash.DEFAULT_SMEM_BUDGET
                row["layout_chosen"] = "one kernel" if row["one_kernel_fits"] else "per-head kernels"
                rows.append(row)
                print(
                    f"N={n:>6} block={block:>4} {variant:<22} one-kernel SMEM {one_smem / 1024:9.1f} KiB, "
                    f"per-head SMEM {row['per_head']['smem_per_call'] / 1024:7.1f} KiB ({row['source']})",
                    flush=True,
                )
    return rows


def _kib(x: int) -> str:
    return f"{x / 1024:,.1f}"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Splash attention metadata for SPAttention masks",
        "",
        f"H = {rows[0]['heads']} heads, one device (no head sharding), square blocks (`block_q = block_kv`, "
        "same for the dq and dkv passes). SMEM per call is the largest of the fwd, dq and dkv pallas calls' "
        "`data_next + block_mask + mask_next`; SMEM is 1 MiB per TensorCore (TPU v4/v5e/v5p/v6e). "
        "Total is every `MaskInfo` array of all passes, including `partial_mask_blocks` (HBM) and "
        "`q_sequence`. \"Fits\" is within `DEFAULT_SMEM_BUDGET` = 768 KiB, the budget "
        "`implementation=\"splash\"` plans with; \"head shards to fit\" is the fewest `tensor` shards "
        "(dividing H) that bring one device's share of the one-kernel metadata within it (None: none).",
        "",
        f"Generated by `python bench/splash_metadata.py` ({meta['jax']}, {meta['when']}).",
        "",
        "| N | block | variant | heads x q-blocks x kv-blocks | one kernel: SMEM/call KiB | one kernel: total KiB "
        "| partial blocks | fits | head shards to fit | per-head kernels: SMEM/call KiB | "
        "per-head: total KiB | `splash` picks | source |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        one, per = r["one_kernel"], r["per_head"]
        lines.append(
            f"| {r['n']:,} | {r['block']} | `{r['variant']}` | {r['entries']:,} | {_kib(one['smem_per_call'])} "
            f"| {_kib(one['total_bytes'])} | {one['partial_blocks']} | {'yes' if r['one_kernel_fits'] else '**no**'} "
            f"| {r['head_shards_to_fit']} | {_kib(per['smem_per_call'])} | {_kib(per['total_bytes'])} "
            f"| {r['layout_chosen']} | {r['source']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--blocks", type=int, nargs="+", default=[512, 1024, 128])
    parser.add_argument("--variants", nargs="+", default=["spattention", "spattention_exclusive"])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument(
        "--measure-limit", type=int, default=1 << 20,
        help="build splash's MaskInfo when heads x q-blocks x kv-blocks is at most this; else count",
    )
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "splash_metadata")
    args = parser.parse_args()
    meta = dict(
        jax=f"jax {jax.__version__}",
        python=platform.python_version(),
        when=time.strftime("%Y-%m-%d"),
        smem_capacity=splash.SMEM_CAPACITY,
        smem_budget=splash.DEFAULT_SMEM_BUDGET,
    )
    rows = run(args.lengths, args.blocks, args.variants, args.heads, args.measure_limit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, meta))
    print(f"wrote {args.out}.json and .md")


if __name__ == "__main__":
    main()
