"""Markdown tables of benchmark rows."""

import pandas as pd

from analysis.tables import attention_table


def test_attention_table_puts_providers_side_by_side_with_ratios():
    rows = [
        dict(provider=p, ms=ms, ms_graph=g, peak_bytes=2**20, status="OK")
        for p, ms, g in [("fused", 1.0, 0.2), ("sdpa_flash", 0.25, 0.1), ("sdpa_math", 3.0, 0.5)]
    ]
    rows.append(dict(provider="sdpa_cudnn", ms=float("nan"), ms_graph=float("nan"), status="OOM"))
    df = pd.DataFrame(rows).assign(dtype="bf16", d=64, n=1024, **{"pass": "fwd_bwd"})
    lines = attention_table(df).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = dict(zip(header, (c.strip() for c in lines[2].strip("|").split("|")), strict=True))
    assert cells["fused"] == "1.000 ms / 1 MiB [0.200]"
    assert cells["sdpa_cudnn"] == "OOM"
    assert cells["math/fused"] == "3.00x"
    assert cells["fused/flash"] == "4.00x"
    assert cells["fused/flash [graph]"] == "2.00x"


def test_an_empty_table_is_a_line_saying_so_not_an_empty_grid():
    from analysis.tables import markdown_table

    for empty in (pd.DataFrame(), pd.DataFrame(columns=["policy", "gain"])):
        assert markdown_table(empty) == "*(no rows: the grid has no cell this table compares)*"
    assert markdown_table(pd.DataFrame({"a": [0.5]})).splitlines() == [
        "| a |",
        "|---|",
        "| 0.5000 |",
    ]
