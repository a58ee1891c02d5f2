"""Markdown tables from tidy DataFrames, without extra dependencies."""

from __future__ import annotations

import pandas as pd


def markdown_table(df: pd.DataFrame, floatfmt: str = ".4f") -> str:
    """A markdown table of `df` (floats with `floatfmt`, NaN as an empty cell); a line
    saying it is empty where it has no rows (markdown has no table without columns)."""
    if df.empty:
        return "*(no rows: the grid has no cell this table compares)*"

    def cell(x):
        if isinstance(x, float):
            return "" if x != x else format(x, floatfmt)
        return str(x).replace("|", "\\|")  # a literal | would split the cell

    lines = [
        "| " + " | ".join(map(str, df.columns)) + " |",
        "|" + "|".join("---" for _ in df.columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def attention_table(df: pd.DataFrame) -> str:
    """The attention benchmark's rows (phase12.benchmarks.attention) as markdown: one row
    per (dtype, D, N, pass), providers side by side (ms, MiB, and the graph-replay ms in
    brackets where measured), with the fused/flash and math/fused ratios."""
    df = df.copy()
    df["cell"] = [
        s if s != "OK" else f"{ms:.3f} ms / {b / 2**20:.0f} MiB" + (f" [{g:.3f}]" if g == g else "")
        for s, ms, b, g in zip(
            df["status"], df["ms"], df["peak_bytes"], df["ms_graph"], strict=True
        )
    ]
    wide = df.pivot_table(
        index=["dtype", "d", "pass", "n"], columns="provider", values="cell", aggfunc="first"
    ).reset_index()
    key = ["dtype", "d", "pass", "n"]

    def ms_of(provider: str, column: str = "ms") -> pd.Series:
        return df[df.provider == provider].set_index(key)[column]

    ratios = {
        "math/fused": ms_of("sdpa_math") / ms_of("fused"),
        "fused/flash": ms_of("fused") / ms_of("sdpa_flash"),
        "fused/flash [graph]": ms_of("fused", "ms_graph") / ms_of("sdpa_flash", "ms_graph"),
    }
    for name, ratio in ratios.items():
        if ratio.notna().any():
            text = ratio.rename(name).map(lambda x: f"{x:.2f}x" if x == x else "-")
            wide = wide.join(text, on=key)
    return markdown_table(wide)
