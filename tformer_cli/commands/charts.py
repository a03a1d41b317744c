"""Loss curves as pictures: in the terminal (plotext) and as a PNG (matplotlib, the `plot`
extra). Rendering only: what is drawn is what runs.catalog.loss_series returns.

Not a command: `tformer runs --plot/--png` and the run card at the end of `train` use it. Each
run gets one colour (matplotlib's tab10, the same in both pictures): its training loss is a line,
its validation loss dots, and the legend names the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from models.weights import atomic_write
from tformer_cli.errors import TformerError
from tformer_cli.runs.catalog import LossSeries
from tformer_cli.units import human_duration

# matplotlib's tab10, as RGB: one colour per run, in the terminal and in the PNG alike
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
AXIS_LABELS = {
    "tokens": "tokens seen",
    "time": "time training",
    "loss": "loss (nats per token)",
    "bpb": "bits per byte",
}
DPI = 100


def chart_title(series: list[LossSeries]) -> str:
    """What the chart shows: the y quantity, and how each part is drawn."""
    y = AXIS_LABELS[series[0].y] if series else "loss"
    return f"{y}: training (line), validation (dots)"


def nice_ticks(top: float, count: int = 5) -> list[float]:
    """Round tick positions from 0 to top: steps of 1, 2, 2.5 or 5 times a power of ten."""
    if not top > 0:
        return [0.0]
    raw = top / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(int(top / step + 1e-9) + 1)]


def tick_label(value: float, axis: str) -> str:
    """A tick as a person reads it: 250k or 1.5M tokens, 3m00s of training."""
    if axis == "time":
        return human_duration(value)
    for suffix, size in (("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


def _extent(series: list[LossSeries]) -> tuple[float, float]:
    """(largest x, largest y) over every point drawn."""
    points = [p for s in series for p in (*s.train, *s.val)]
    return max((p[0] for p in points), default=1.0), max((p[1] for p in points), default=1.0)


# -- the terminal ---------------------------------------------------------------------------------


@dataclass
class Plotted:
    """What the terminal chart drew for one run, read back from plotext's signals."""

    name: str
    color: tuple[int, int, int]
    train: list[tuple[float, float]]
    val: list[tuple[float, float]]


@dataclass
class TerminalChart:
    """The chart as text with ANSI colours (text) and without (plain), and what it drew."""

    text: str
    plain: str
    plotted: list[Plotted]


def terminal_chart(
    series: list[LossSeries], width: int = 80, height: int = 20, title: str | None = None
) -> TerminalChart:
    """The loss curves drawn with plotext in width x height characters."""
    import plotext as plt

    figure = plt.figure
    figure.clear()
    try:
        figure.theme("simple")  # no background: it reads on dark and light terminals alike
        figure.plot_size(width, height)
        plotted = [_draw(figure, plt, s, PALETTE[i % len(PALETTE)]) for i, s in enumerate(series)]
        top_x, top_y = _extent(series)
        ticks = nice_ticks(top_x)
        x = series[0].x if series else "tokens"
        figure.ruler("x").ticks(ticks, [tick_label(t, x) for t in ticks])
        # loss falls from the upper left: the upper right corner is where the legend hides least
        figure.legend(x=top_x, y=top_y, relative=True, ha="right", va="top")
        figure.title(title or chart_title(series))
        figure.label(AXIS_LABELS[x], axis="x")
        matrix = figure.build()
        return TerminalChart(matrix.string(), matrix.string(colorless=True), plotted)
    finally:
        figure.clear()  # the figure is plotext's global: leave nothing for the next chart


def _draw(figure, plt, series: LossSeries, color: tuple[int, int, int]) -> Plotted:
    """Draw one run (a labelled line, unlabelled dots in its colour); return what was drawn."""
    drawn = {}
    for part, symbol in (("train", "hd"), ("val", "●")):
        points = getattr(series, part)
        if not points:
            drawn[part] = []
            continue
        signal = figure.signal(
            [p[0] for p in points],
            [p[1] for p in points],
            marker=plt.marker(symbol, plt.pixel(foreground=color)),
        )
        if part == "train":
            signal.lines()
        if part == "train" or not series.train:  # one legend entry per run
            signal.label(series.name)
        figure.draw(signal)
        drawn[part] = [(p.x(), p.y()) for p in (signal.get(i) for i in range(signal.length()))]
    return Plotted(series.name, color, drawn["train"], drawn["val"])


# -- the PNG --------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """--size WxH in pixels, e.g. 1000x600."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise TformerError(
            f"--size {text!r}: give width x height in pixels, e.g. 1000x600"
        ) from None
    if not (100 <= width <= 10_000 and 100 <= height <= 10_000):
        raise TformerError(f"--size {text!r}: each side must be 100 to 10,000 pixels")
    return width, height


def write_png(
    series: list[LossSeries], path: str, width: int, height: int, title: str | None = None
) -> None:
    """The same chart as a PNG of width x height pixels (matplotlib, without a display)."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise TformerError(
            "--png needs matplotlib: pip install 'tformer[plot]' (or use --plot in the terminal)"
        ) from None
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    axes = figure.add_subplot()
    for i, s in enumerate(series):
        color = tuple(c / 255 for c in PALETTE[i % len(PALETTE)])
        if s.train:
            axes.plot(*zip(*s.train, strict=True), color=color, linewidth=1.8, label=s.name)
        if s.val:
            label = None if s.train else s.name
            axes.plot(*zip(*s.val, strict=True), "o", color=color, markersize=5, label=label)
    x = series[0].x if series else "tokens"
    axes.xaxis.set_major_formatter(FuncFormatter(lambda v, _: tick_label(max(v, 0.0), x)))
    axes.set_xlabel(AXIS_LABELS[x])
    axes.set_ylabel(AXIS_LABELS[series[0].y] if series else "loss")
    axes.set_title(title or chart_title(series))
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI))
