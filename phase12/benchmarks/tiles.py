"""Block-size sweep of the tiled attention kernels: `python run.py bench tiles`.

    python run.py bench tiles [--cells fp32:4096:64:bwd,bf16:4096:128:dbwd]
                              [--candidates 32x32x4x1,16x32x4x1] [--both-structures]
                              [--out DIR]

A cell is DTYPE:N:D:FAMILY (N = M, B*H = 32, no mask). For each cell, the tile in use
(`kernels.launch.launch_config`) and every candidate tile (block_n x block_m, warps,
stages; the structure, `atomic_rows`, stays the one in use unless `--both-structures`,
which tries the tile in use and every candidate in both structures of the backward
families) are handed to the family's launcher (its `tile` argument) and the launch is
timed alone (median of `triton.testing.do_bench`): the forward kernel for `fwd`, the
backward kernels for `bwd`, the double-backward kernels for `dbwd`. A candidate that
does not fit (shared memory, registers) is recorded with its error. Prints, per
cell, the tile in use and the best three; writes every measurement to tiles.csv (after
each cell, so an interrupted sweep keeps its finished cells). `--candidates`
(BNxBMxWARPSxSTAGES) replaces the list of CANDIDATES, e.g. to fit a slow cell (float32
ieee at D = 128, whose candidates compile for minutes) into a time limit.
`kernels/launch.py:_TILES` is edited by hand from the table: the sweep informs a
decision, it does not make it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch

from kernels.reference import default_scale
from phase12.benchmarks.attention import DTYPES, float32_precision
from phase12.io import write_atomic

# Imported where the kernels run: Triton may be absent (run.py bench tiles --help).
if TYPE_CHECKING:
    from kernels import launch

FAMILIES = ("fwd", "bwd", "dbwd")
# (block_n, block_m, num_warps, num_stages)
CANDIDATES = [
    (128, 64, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (64, 32, 4, 2),
    (64, 32, 4, 3), (32, 64, 4, 2), (32, 32, 4, 2), (128, 32, 8, 2), (128, 64, 8, 1),
    (64, 64, 4, 1), (64, 32, 4, 1), (32, 32, 4, 1), (16, 32, 4, 1), (16, 32, 4, 2),
]  # fmt: skip
DEFAULT_CELLS = (
    "fp32:4096:64:bwd,fp32:4096:64:dbwd,bf16:2048:64:bwd,bf16:4096:64:bwd,"
    "bf16:4096:64:dbwd,fp32:1024:128:fwd,fp32:1024:128:bwd,fp32:1024:128:dbwd,"
    "bf16:4096:128:dbwd"
)


def parse_candidates(spec: str) -> list[tuple[int, int, int, int]]:
    """'32x32x4x1,...' -> [(block_n, block_m, warps, stages)]; ValueError names a bad one."""
    tiles = []
    for tile in spec.split(","):
        parts = tile.split("x")
        if len(parts) != 4 or not all(x.isdecimal() and int(x) > 0 for x in parts):
            raise ValueError(
                f"bad candidate {tile!r}: want BLOCK_NxBLOCK_MxWARPSxSTAGES, e.g. 32x32x4x1"
            )
        block_n, block_m, warps, stages = map(int, parts)
        if block_n < 16 or block_m < 16 or block_n & (block_n - 1) or block_m & (block_m - 1):
            raise ValueError(f"bad candidate {tile!r}: blocks are powers of two >= 16")
        if (block_n, block_m, warps, stages) in tiles:
            raise ValueError(f"candidate {tile!r} given twice; give each once")
        tiles.append((block_n, block_m, warps, stages))
    return tiles


def parse_cells(spec: str) -> list[tuple[str, int, int, str]]:
    """'fp32:4096:64:bwd,...' -> [(dtype, n, d, family)]; ValueError names a bad cell."""
    cells = []
    for cell in spec.split(","):
        parts = cell.split(":")
        if (
            len(parts) != 4
            or parts[0] not in DTYPES
            or parts[3] not in FAMILIES
            or not all(x.isdecimal() and int(x) > 0 for x in parts[1:3])
        ):
            raise ValueError(
                f"bad cell {cell!r}: want DTYPE:N:D:FAMILY with DTYPE in {sorted(DTYPES)} "
                f"and FAMILY in {sorted(FAMILIES)}, N and D positive, e.g. fp32:4096:64:bwd"
            )
        if (parts[0], int(parts[1]), int(parts[2]), parts[3]) in cells:
            raise ValueError(f"cell {cell!r} given twice; give each once")
        cells.append((parts[0], int(parts[1]), int(parts[2]), parts[3]))
    return cells


def family_launch(family: str, q, k, v, do, precision: str, tile: launch.LaunchConfig):
    """A callable that launches the kernels of `family` once with `tile` (the inputs
    of the backward passes are computed here, with the tiles in use)."""
    from kernels import launch

    scale, args = default_scale(q.shape[-1]), (False,)
    if family == "fwd":
        return lambda: launch.attention_forward(q, k, v, *args, scale, precision, tile)
    o, lse = launch.attention_forward(q, k, v, *args, scale, precision)
    if family == "bwd":
        return lambda: launch.attention_backward(q, k, v, o, lse, do, *args, scale, precision, tile)
    g = torch.Generator(q.device).manual_seed(1)
    u = [torch.randn(t.shape, generator=g, device=t.device, dtype=t.dtype) for t in (q, k, v)]
    return lambda: launch.attention_double_backward(
        q, k, v, o, lse, do, *u, *args, scale, precision, tile
    )


def time_tile(dtype_name: str, n: int, d: int, family: str, tile) -> tuple[float, str]:
    """(median ms or NaN, error or '') of the family's launch with `tile`."""
    import triton

    g = torch.Generator("cuda").manual_seed(0)
    dtype = DTYPES[dtype_name]
    q, k, v, do = (torch.randn(4, 8, n, d, device="cuda", dtype=dtype, generator=g) for _ in "qkvo")
    try:
        run = family_launch(family, q, k, v, do, float32_precision(dtype_name), tile)
        run()
        torch.cuda.synchronize()
        return triton.testing.do_bench(run, warmup=5, rep=30, return_mode="median"), ""
    except Exception as e:  # does not fit: recorded, the sweep goes on
        return float("nan"), str(e).splitlines()[0][:200]


def cell_tiles(
    current: launch.LaunchConfig,
    family: str,
    candidates: list[tuple[int, int, int, int]],
    both_structures: bool = False,
) -> list[launch.LaunchConfig]:
    """The tile in use first, then every candidate in the structure in use or, with
    `both_structures` and a backward family, in both (the forward has one structure);
    each tile once."""
    structures = [current.atomic_rows]
    if both_structures and family != "fwd":
        structures.append(not current.atomic_rows)
    shapes = [(current.block_n, current.block_m, current.num_warps, current.num_stages)]
    tiles = [
        replace(current, block_n=bn, block_m=bm, num_warps=w, num_stages=st, atomic_rows=atomic)
        for bn, bm, w, st in shapes + list(candidates)
        for atomic in structures
    ]
    return list(dict.fromkeys(tiles))


def sweep(
    cells: list[tuple[str, int, int, str]],
    csv: Path | None = None,
    candidates: list[tuple[int, int, int, int]] = CANDIDATES,
    both_structures: bool = False,
) -> pd.DataFrame:
    """The tiles of `cell_tiles`, for every cell; with `csv`, the rows so far are
    (re)written there after each cell, so a sweep stopped part-way keeps the cells it
    finished."""
    from kernels import launch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = []
    for dname, n, d, family in cells:
        dtype = DTYPES[dname]
        current = launch.launch_config(family, n, n, d, dtype, float32_precision(dname))
        tiles = cell_tiles(current, family, candidates, both_structures)
        for tile in tiles:
            ms, error = time_tile(dname, n, d, family, tile)
            rows.append(
                dict(device_name=device, dtype=dname, n=n, d=d, family=family)
                | dict(block_n=tile.block_n, block_m=tile.block_m, warps=tile.num_warps)
                | dict(stages=tile.num_stages, atomic_rows=tile.atomic_rows)
                | dict(in_use=tile == current, ms=ms, error=error)
            )
        print(_summary(pd.DataFrame(rows[-len(tiles) :])), flush=True)
        if csv is not None:  # replaced whole: never half a table
            write_atomic(csv, pd.DataFrame(rows).to_csv(index=False))
    return pd.DataFrame(rows)


def _summary(cell: pd.DataFrame) -> str:
    def name(r) -> str:
        atomic = " atomic rows" if r.atomic_rows else ""
        return f"{r.block_n}x{r.block_m} w{r.warps} s{r.stages}{atomic}: {r.ms:.3f} ms"

    first = cell.iloc[0]
    best = cell.dropna(subset=["ms"]).sort_values("ms").head(3)
    return (
        f"{first['dtype']} N={first.n} D={first.d} {first.family}: in use {name(first)}; "
        f"best {', '.join(name(r) for r in best.itertuples())}; "
        f"{cell.ms.isna().sum()} of {len(cell)} do not fit"
    )
