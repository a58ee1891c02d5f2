"""The block-size sweep: its bookkeeping (the GPU timing replaced by a stand-in) and the
explicit tile it hands to the launchers."""

import pandas as pd
import pytest
import torch

from kernels import launch
from phase12.benchmarks import tiles


def test_tile_sweep_tries_every_candidate_after_the_tile_in_use(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(launch, "interpreter_enabled", lambda: False)
    in_use = launch.launch_config("bwd", 2048, 2048, 64, torch.bfloat16)
    seen = []

    def fake_time(dtype_name, n, d, family, tile):
        seen.append(tile)
        too_big = tile.block_n * tile.block_m > 64 * 64
        return (float("nan"), "out of resource") if too_big else (1.0 / tile.num_stages, "")

    monkeypatch.setattr(tiles, "time_tile", fake_time)
    df = tiles.sweep(tiles.parse_cells("bf16:2048:64:bwd"), tmp_path / "tiles.csv")
    back = pd.read_csv(tmp_path / "tiles.csv")  # written as each cell ends
    assert list(back.columns) == list(df.columns) and back.ms.equals(df.ms)
    assert capsys.readouterr().out.startswith(
        "bf16 N=2048 D=64 bwd: in use 64x64 w4 s3 atomic rows:"
    )
    # Candidates keep the structure in use (the backward sums dQ with atomics at D = 64).
    candidates = {launch.LaunchConfig(*c, atomic_rows=True) for c in tiles.CANDIDATES}
    assert seen[0] == in_use and set(seen) == candidates | {in_use} and len(df) == len(seen)
    assert df.in_use.tolist() == [True] + [False] * (len(df) - 1)
    assert df.ms.isna().sum() == (df.block_n * df.block_m > 64 * 64).sum()
    with pytest.raises(ValueError, match="bad cell 'bf16:2048:64'"):
        tiles.parse_cells("bf16:2048:64")

    chosen = tiles.parse_candidates("32x32x4x1,16x32x4x2")
    assert chosen == [(32, 32, 4, 1), (16, 32, 4, 2)]
    seen.clear()
    tiles.sweep(tiles.parse_cells("bf16:2048:64:bwd"), candidates=chosen)
    assert in_use.atomic_rows and df.atomic_rows.all()
    assert seen == [
        in_use,
        launch.LaunchConfig(32, 32, 4, 1, atomic_rows=True),
        launch.LaunchConfig(16, 32, 4, 2, atomic_rows=True),
    ]


def test_both_structures_puts_every_backward_tile_in_each_structure():
    in_use = launch.LaunchConfig(64, 64, 4, 3, atomic_rows=True)
    candidates = [(32, 32, 4, 1), (64, 64, 4, 3)]  # the second is the tile in use
    assert tiles.cell_tiles(in_use, "dbwd", candidates, both_structures=True) == [
        in_use,
        launch.LaunchConfig(64, 64, 4, 3, atomic_rows=False),
        launch.LaunchConfig(32, 32, 4, 1, atomic_rows=True),
        launch.LaunchConfig(32, 32, 4, 1, atomic_rows=False),
    ]
    assert tiles.cell_tiles(in_use, "dbwd", candidates) == [
        in_use,
        launch.LaunchConfig(32, 32, 4, 1, atomic_rows=True),
    ]
    forward = launch.LaunchConfig(128, 64, 8, 3)  # one structure: nothing to flip
    assert tiles.cell_tiles(forward, "fwd", candidates, both_structures=True) == [
        forward,
        launch.LaunchConfig(32, 32, 4, 1),
        launch.LaunchConfig(64, 64, 4, 3),
    ]


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("family", tiles.FAMILIES)
def test_the_family_launch_runs_the_given_tile(family, monkeypatch):
    """The launcher of `family` takes the tile it is given (launch_config is not asked)
    and computes what the tile table's choice computes, in float64."""
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, 37, 8, generator=g, dtype=torch.float64) for _ in "qkvo")
    expected = tiles.family_launch(family, q, k, v, do, "ieee", None)()
    chosen = launch.launch_config
    monkeypatch.setattr(
        launch,
        "launch_config",
        lambda kind, *a: (
            pytest.fail(f"{kind} asked for a tile") if kind == family else chosen(kind, *a)
        ),
    )
    got = tiles.family_launch(family, q, k, v, do, "ieee", launch.LaunchConfig(32, 16, 1, 1))()
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
