"""`tformer runs [DIR ...]`: every run in a table, or their loss curves as pictures."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from tformer_cli.commands.charts import PALETTE, parse_size, terminal_chart, write_png
from tformer_cli.errors import TformerError
from tformer_cli.runs.catalog import (
    SORT_KEYS,
    X_AXES,
    Y_AXES,
    LossSeries,
    RunRow,
    describe_run,
    display_path,
    find_runs,
    loss_series,
    sort_rows,
)
from tformer_cli.units import human_count, human_duration

EXAMPLES = (
    "tformer runs",
    "tformer runs runs/ --sort bpb",
    "tformer runs --plot runs/shakespeare runs/chat",
    "tformer runs --plot --x time --y bpb",
    "tformer runs --png curves.png --size 1000x600",
)


def runs(
    paths: list[Path] = typer.Argument(
        None,
        metavar="DIR",
        help="Folders to search for runs (recursively), or runs (default: the current folder).",
    ),
    sort: str = typer.Option(
        "name", "--sort", metavar="KEY", help=f"Sort by {', '.join(SORT_KEYS)}."
    ),
    plot: bool = typer.Option(
        False, "--plot", help="Draw the runs' loss curves in the terminal instead of the table."
    ),
    png: Path = typer.Option(
        None, "--png", metavar="FILE", help="Write the loss curves as a PNG (matplotlib)."
    ),
    size: str = typer.Option("1000x600", "--size", metavar="WxH", help="The PNG's pixels."),
    x: str = typer.Option("tokens", "--x", metavar="tokens|time", help="The curves' x axis."),
    y: str = typer.Option("loss", "--y", metavar="loss|bpb", help="The curves' y axis."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the rows (with --plot: the curves) as JSON."
    ),
) -> None:
    """List every run under the folders: kind, base, size, tokens, time, best validation loss,
    bits per byte, speed, MFU and date. --plot draws their loss curves."""
    if sort not in SORT_KEYS:
        raise TformerError(f"--sort {sort!r}: choose one of {', '.join(SORT_KEYS)}")
    if x not in X_AXES or y not in Y_AXES:
        raise TformerError(f"--x takes {' or '.join(X_AXES)}, --y {' or '.join(Y_AXES)}")
    pixels = parse_size(size) if png else None
    roots = paths or [Path(".")]
    found = find_runs(roots)
    out, err = Console(), Console(stderr=True, soft_wrap=True)
    if not found:
        where = ", ".join(str(r) for r in roots)
        err.print(f"no runs under {where}", markup=False, highlight=False)
        if as_json:
            typer.echo("[]")
        return
    if plot or png:
        pictures(curves(found, x, y, err), plot, png, pixels, as_json, out, err)
        return
    rows = sort_rows([describe_run(r, display_path(r)) for r in found], sort)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    out.print(runs_table(rows, out.width))
    for row in rows:
        if row.error:
            err.print(f"{row.name}: {row.error}", markup=False, highlight=False)


def _cell(value, fmt: str = "{:,.4f}") -> str:
    return "-" if value is None else fmt.format(value)


# Columns a narrow terminal drops first, in this order, so the rest keep their width.
OPTIONAL_COLUMNS = ("MFU", "tokens/s", "wall time", "date", "base")


def runs_table(rows: list[RunRow], width: int | None = None) -> Table:
    """The rows as a rich table; a row whose files could not be read says so. Within width
    (characters), the OPTIONAL_COLUMNS go first rather than squeezing the others."""
    cells = [_row_cells(r) for r in rows]
    names = list(cells[0]) if cells else []
    for dropped in (None, *OPTIONAL_COLUMNS):
        if dropped:
            names.remove(dropped)
        table = Table()
        for name in names:
            numeric = name not in ("run", "kind", "base", "date")
            table.add_column(name, justify="right" if numeric else "left", no_wrap=name != "run")
        for row in cells:
            table.add_row(*(row[name] for name in names))
        if width is None or Measurement.get(_MEASURE, _MEASURE.options, table).maximum <= width:
            break
    left_out = [name for name in OPTIONAL_COLUMNS if cells and name not in names]
    if left_out:
        table.caption = f"too narrow for {', '.join(left_out)}: see --json"
        table.caption_justify = "left"
    return table


_MEASURE = Console(width=10_000)


def _row_cells(r: RunRow) -> dict[str, str]:
    if r.error and "missing" in r.error:
        loss = bpb = "no card"
    elif r.error:
        loss = bpb = "unreadable"
    else:
        loss, bpb = _cell(r.best_val_loss), _cell(r.best_val_bpb, "{:.3f}")
    return {
        "run": r.name,
        "kind": r.kind,
        "base": r.base or "-",
        "params": human_count(r.params),
        "tokens": human_count(r.tokens_seen),
        "wall time": "-" if r.wall_seconds is None else human_duration(r.wall_seconds),
        "best val loss": loss,
        "bits/byte": bpb,
        "tokens/s": _cell(r.tokens_per_s, "{:,.0f}"),
        "MFU": _cell(None if r.mfu is None else 100 * r.mfu, "{:.1f}%"),
        "date": r.date.strftime("%Y-%m-%d %H:%M") if r.date else "-",
    }


def curves(found: list[Path], x: str, y: str, err: Console) -> list[LossSeries]:
    """The loss curves of the runs found (runs without any are named on stderr), at most one
    per colour."""
    series = []
    for run in found:
        try:
            series.append(loss_series(run, x, y, display_path(run)))
        except TformerError as e:
            err.print(f"not plotted: {e}", markup=False, highlight=False)
    if not series:
        raise TformerError("none of these runs has loss curves to draw (metrics.jsonl)")
    if len(series) > len(PALETTE):
        err.print(f"drawing the first {len(PALETTE)} runs (one colour each); name fewer runs")
        series = series[: len(PALETTE)]
    if any(s.time_estimated for s in series):
        err.print("[dim]times of runs logged before metrics had them are estimated from steps[/]")
    return series


def pictures(
    series: list[LossSeries],
    plot: bool,
    png: Path | None,
    pixels: tuple[int, int] | None,
    as_json: bool,
    out: Console,
    err: Console,
) -> None:
    """The curves as a PNG (--png), as JSON (--json), or drawn in the terminal (--plot)."""
    if png:
        write_png(series, str(png), *pixels)
        err.print(f"wrote {png}", markup=False, highlight=False)
    if as_json:
        data = [{"run": s.name, "x": s.x, "y": s.y, "train": s.train, "val": s.val} for s in series]
        typer.echo(json.dumps(data, indent=2))
    elif plot:
        chart = terminal_chart(series, width=min(out.width, 120), height=24)
        out.print(Text.from_ansi(chart.text))
