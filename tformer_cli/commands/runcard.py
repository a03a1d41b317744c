"""The run card: one rich summary of a training run (the same data is saved as run_card.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tformer_cli.commands.charts import TerminalChart, terminal_chart
from tformer_cli.errors import TformerError
from tformer_cli.runs.catalog import loss_series
from tformer_cli.units import human_bytes, human_duration

CHART_WIDTH, CHART_HEIGHT = 72, 14  # the card's small chart: a glance, not a study


def _num(value: float | None, fmt: str = "{:.4f}") -> str:
    return "-" if value is None else fmt.format(value)


def _bpb(value: float | None) -> str:
    # fine-tuning evaluates assistant tokens only, which have no bytes-of-text measure
    return "" if value is None else f" ({value:.3f} bits/byte)"


def run_card_rows(card: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of the card, in display order."""
    m = card["model"]
    shape = (
        f"{m['n_layers']} layers, dim {m['dim']}, {m['n_heads']} heads ({m['n_kv_heads']} kv), "
        f"vocab {m['vocab_size']}"
    )
    best = f"{_num(card['best_val_loss'])}{_bpb(card['best_val_bpb'])}"
    mfu = card.get("mfu")
    peak = card.get("matmul_peak_flops")
    auto = card.get("auto")
    chosen = [("chosen by", f"--preset auto: {auto['why']}")] if auto else []
    return [
        ("model", f"{card['preset']}: {shape}"),
        *chosen,
        ("parameters", f"{card['params']:,}"),
        (
            "device",
            f"{card['device']} {card['precision']}"
            + (f" x{card['world_size']}" if card["world_size"] > 1 else "")
            + (f", {card['attention']} attention" if card.get("attention") else ""),
        ),
        (
            "steps",
            f"{card['steps']:,} x {card['batch_size']} x {card['seq_len']} tokens"
            + (" (interrupted)" if card["interrupted"] else ""),
        ),
        ("tokens seen", f"{card['tokens_seen']:,}"),
        ("best val loss", f"{best} at step {card['best_step']}"),
        ("final val loss", f"{_num(card['final_val_loss'])}{_bpb(card['final_val_bpb'])}"),
        ("throughput", f"{card['tokens_per_s']:,.0f} tokens/s"),
        (
            "MFU",
            "-"
            if mfu is None
            else f"{100 * mfu:.1f}% of {peak / 1e9:,.0f} GFLOP/s measured matmul peak",
        ),
        ("peak memory", human_bytes(card["peak_memory_bytes"])),
        ("wall time", human_duration(card["wall_seconds"])),
        ("loss", card["loss_sparkline"] or "-"),
        ("saved", f"{card['saved']['latest']} (latest), {card['saved']['best']} (best)"),
    ]


def render_run_card(card: dict[str, Any], console: Console) -> None:
    """The card as a two-column rich table, and under it a small chart of the run's loss."""
    table = Table(title=f"run card: {card['run_dir']}", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    for label, value in run_card_rows(card):
        table.add_row(label, value)
    console.print(table)
    chart = card_chart(card, min(console.width, CHART_WIDTH))
    if chart is not None:
        console.print(Text.from_ansi(chart.text))


def card_chart(card: dict[str, Any], width: int) -> TerminalChart | None:
    """The run's training and validation loss against tokens seen (runs.catalog.loss_series);
    None when its metrics cannot be read or hold too little to draw."""
    try:
        series = loss_series(Path(card["run_dir"]), name=Path(card["run_dir"]).name)
    except (TformerError, KeyError, TypeError):
        return None
    if len(series.train) + len(series.val) < 2:
        return None
    return terminal_chart([series], width=width, height=CHART_HEIGHT)
