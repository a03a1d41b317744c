"""Rich tables (and a small bar chart) for a profile report; builds renderables, prints nothing."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from models.config import ModelConfig
from tformer_cli.profiling.analytic import attention_memory
from tformer_cli.units import human_bytes, human_count

METHOD_NAMES = {
    "cuda_max_allocated": "CUDA max allocated",
    "rss_hwm": "peak RSS growth",
    "ru_maxrss": "ru_maxrss growth (a lower bound)",
}


def human_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:,.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:,.1f} ms"
    return f"{s * 1e6:,.0f} µs"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _table(
    title: str, *columns: str, caption: str | None = None, left: tuple[int, ...] = (0,)
) -> Table:
    """Numbers right-aligned; the columns in `left` (labels, prose) left-aligned."""
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for i, col in enumerate(columns):
        table.add_column(
            col, justify="left" if i in left else "right", style="bold" if i == 0 else None
        )
    return table


def header(r: dict[str, Any]) -> Text:
    m = r["model"]
    return Text.from_markup(
        f"[bold]tformer profile[/]: {m['source']} [bold]{m['label']}[/] on {r['device']} ({r['device_name']}, "
        f"{r['threads']} threads), {r['precision']}, batch {r['batch_size']} x T={r['seq_len']}"
        + (" [dim](quick)[/]" if r["quick"] else "")
    )


def model_table(r: dict[str, Any]) -> Table:
    counts, total, b = r["params_by_component"], r["params"], r["bytes_per_element"]
    tied = r["model"]["config"]["tie_embeddings"]
    caption = f"bytes at {r['precision']} ({b} per parameter)"
    if r.get("checkpoint_params") is not None:
        same = "matches" if r["checkpoint_params"] == total else "DIFFERS from"
        caption += (
            f"; the checkpoint stores {r['checkpoint_params']:,} elements, which {same} the count"
        )
    table = _table(
        "1. Model: parameters", "component", "parameters", "share", "bytes", caption=caption
    )
    for name, n in counts.items():
        label = name + (" (tied to the embeddings)" if name == "head" and tied else "")
        table.add_row(label, f"{n:,}", _pct(n / total), human_bytes(n * b))
    table.add_row("total", f"{total:,}", "100%", human_bytes(r["param_bytes"]), style="bold")
    return table


def flops_table(r: dict[str, Any]) -> Table:
    f, T, B = r["flops_forward_per_token"], r["seq_len"], r["batch_size"]
    cross = r["attention_crossover_seq_len"]
    caption = (
        f"6N rule: {human_count(r['six_n_flops_per_token'], 'FLOP')}/token; with the attention term at T={T}: "
        f"{human_count(r['flops_per_token'], 'FLOP')}. Attention (projections + scores) passes the MLP at "
        f"T >= {cross['attention']:,}, the T-dependent scores alone at T >= {cross['scores']:,}. Scores count "
        "the full T x T square (PaLM's convention, as MFU does); causal kernels can skip about half."
    )
    table = _table(
        f"2a. Analytic FLOPs per token at T={T}",
        "part",
        "forward",
        "forward+backward",
        "share",
        f"fwd+bwd per step (B={B})",
        caption=caption,
    )
    fwd = r["flops_per_token_forward"]
    rows = [
        ("attention: projections", f["attention_proj"]),
        ("attention: scores (x T)", f["attention_scores"]),
        ("MLP", f["mlp"]),
        ("head", f["head"]),
    ]
    for name, n in rows:
        table.add_row(
            name, human_count(n), human_count(3 * n), _pct(n / fwd), human_count(3 * n * T * B)
        )
    table.add_row(
        "total",
        human_count(fwd),
        human_count(r["flops_per_token"]),
        "100%",
        human_count(r["flops_per_step"]),
        style="bold",
    )
    return table


def memory_table(r: dict[str, Any]) -> Table:
    tm, im, T, B = r["train_memory"], r["inference_memory"], r["seq_len"], r["batch_size"]
    kv_note = (
        f"KV cache = 2 x L x n_kv_heads x head_dim x T x B x {r['bytes_per_element']} bytes = "
        f"{human_bytes(r['kv_cache_bytes'])} ({human_bytes(r['kv_cache_bytes_per_token'])} per token)"
    )
    saving = r["kv_cache_gqa_saving"]
    kv_note += (
        f"; grouped-query attention makes it {saving:.1f}x smaller than with one key/value head per query head "
        f"({human_bytes(r['kv_cache_bytes_mha'])})"
        if saving > 1
        else "; no GQA (one key/value head per query head)"
    )
    table = _table(
        f"2b. Analytic memory at B={B}, T={T}",
        "training (AdamW)",
        "bytes",
        "inference",
        "bytes",
        left=(0, 2),
        caption=kv_note
        + f". Math attention would make training {human_bytes(r['train_memory_math']['total'])}.",
    )
    left = [
        ("weights (fp32 master)", tm["weights"]),
        ("gradients", tm["grads"]),
        ("AdamW moments", tm["optimizer"]),
        ("activations", tm["activations"]),
        ("backward transient", tm["transient"]),
    ]
    right = [
        (f"weights ({r['precision']})", im["weights"]),
        ("KV cache", im["kv_cache"]),
        ("prefill workspace", im["workspace"]),
    ]
    for i, (name, n) in enumerate(left):
        rname, rn = right[i] if i < len(right) else ("", None)
        table.add_row(name, human_bytes(n), rname, human_bytes(rn) if rn is not None else "")
    table.add_row(
        "total", human_bytes(tm["total"]), "total", human_bytes(im["total"]), style="bold"
    )
    return table


def measured_table(r: dict[str, Any]) -> Table | None:
    m = r.get("measured") or {}
    if not m:
        return None
    T = r["seq_len"]
    train = (m.get("train") or {}).get(str(T))
    inf = m.get("inference")
    method = METHOD_NAMES.get(m.get("memory_method") or "", "not measurable on this device")
    table = _table(
        f"3. Measured on this device at B={r['batch_size']}, T={T}",
        "what",
        "value",
        "detail",
        caption=f"medians after warm-up; peak memory is {method} over the workload, weights included",
        left=(0, 2),
    )
    table.add_row(
        "matmul peak",
        human_count(m["matmul_peak_flops"], "FLOP/s"),
        f"{r['precision']} dense matmul",
    )
    table.add_row(
        "memory bandwidth",
        f"{human_bytes(m['memory_bandwidth_bytes_per_s'])}/s",
        "large copy, read + write",
    )
    if train:
        table.add_row(
            "training step",
            human_seconds(train["step_s"]),
            f"{train['tokens_per_s']:,.0f} tokens/s, MFU {_pct(train['mfu'])}",
        )
        table.add_row(
            "  peak memory",
            human_bytes(train["peak_memory_bytes"]),
            f"analytic {human_bytes(r['train_memory']['total'])}",
        )
    if inf:
        table.add_row(
            "prefill",
            f"{inf['prefill_tokens_per_s']:,.0f} tokens/s",
            human_seconds(inf["prefill_s"]),
        )
        table.add_row(
            "decode, KV cache",
            f"{inf['decode_tokens_per_s']:,.1f} tokens/s",
            f"{human_seconds(inf['decode_step_s'])} per step",
        )
        table.add_row(
            "decode, no cache",
            f"{inf['decode_tokens_per_s_no_cache']:,.1f} tokens/s",
            f"recomputes {T} positions per token; the cache is {r['decode_cache_speedup']:,.1f}x faster",
        )
        util = r.get("decode_bandwidth_utilization")
        table.add_row(
            "decode bandwidth",
            f"{human_bytes(r['decode_bandwidth_bytes_per_s'])}/s",
            f"{human_bytes(r['decode_bytes_per_step'])} of weights + KV cache read per step"
            + (f", {_pct(util)} of the measured bandwidth" if util is not None else ""),
        )
        table.add_row(
            "  peak memory",
            human_bytes(inf["peak_memory_bytes"]),
            f"analytic {human_bytes(r['inference_memory']['total'])}",
        )
    return table


def attention_table(r: dict[str, Any]) -> Table | None:
    att = (r.get("measured") or {}).get("attention") or {}
    if not any(att.values()):
        return None
    cfg = ModelConfig.from_dict(r["model"]["config"])
    T, B = r["seq_len"], r["batch_size"]
    table = _table(
        f"3b. Attention implementations at T={T} (one layer, forward + backward)",
        "implementation",
        "time",
        "peak memory",
        "analytic memory",
        caption="sdpa: the fused kernel, O(T) memory; math: softmax(q k^T) v with the T x T matrix materialised",
    )
    for impl, res in att.items():
        analytic_bytes = human_bytes(attention_memory(cfg, T, B, r["precision"], impl))
        if res:
            table.add_row(
                impl,
                human_seconds(res["seconds"]),
                human_bytes(res["peak_memory_bytes"]),
                analytic_bytes,
            )
        else:
            table.add_row(impl, "skipped", "-", analytic_bytes)
    return table


def fit_table(r: dict[str, Any]) -> Table:
    fit, T, B = r["fit"], r["seq_len"], r["batch_size"]
    budget = fit["budget_bytes"]
    caption = (
        f"budget {human_bytes(budget)} = {fit['headroom']:.0%} of the {human_bytes(fit['free_bytes'])} free now"
        if budget
        else "free memory unknown on this device"
    )
    if fit["notes"]:
        caption += "\n" + "\n".join(f"note: {n}" for n in fit["notes"])
    table = _table(
        f"4. Will it fit? ({r['precision']})",
        "mode",
        f"needs at B={B}, T={T}",
        "fits",
        f"largest batch at T={T}",
        f"largest T at B={B}",
        caption=caption,
    )
    for mode in ("train", "inference"):
        e = fit[mode]
        fits = "-" if "fits" not in e else ("yes" if e["fits"] else "[red]no[/]")
        table.add_row(
            mode,
            human_bytes(e["bytes"]),
            fits,
            f"{e.get('max_batch_size', '-'):,}" if "max_batch_size" in e else "-",
            f"{e.get('max_seq_len', '-'):,}" if "max_seq_len" in e else "-",
        )
    return table


def scaling_table(r: dict[str, Any]) -> Table | None:
    rows = r["scaling"]
    if len(rows) < 2:
        return None
    ref = next((row["seq_len"] for row in reversed(rows) if row["train_step_s"]), None)
    table = _table(
        f"5. Scaling with T (training step, B={r['batch_size']})",
        "T",
        "FLOP/step",
        "attn share",
        "time",
        "predicted",
        "MFU",
        "mem analytic",
        "mem measured",
        caption=(
            f"predicted: the step at T={ref:,} scaled by analytic FLOPs" if ref else "not measured"
        )
        + "; memory: weights, grads, AdamW, activations (sdpa)",
    )
    for row in rows:
        table.add_row(
            f"{row['seq_len']:,}",
            human_count(row["flops_per_step"]),
            _pct(row["attention_flops_share"]),
            human_seconds(row["train_step_s"]),
            human_seconds(row["predicted_step_s"]),
            _pct(row["mfu"]),
            human_bytes(row["train_memory_bytes"]),
            human_bytes(row["train_peak_memory_bytes"]),
        )
    return table


def scaling_chart(r: dict[str, Any], width: int = 40) -> Text | None:
    """Time per token, measured (█) against the analytic FLOPs per token (░), each scaled to its largest."""
    rows = r["scaling"]
    if len(rows) < 2:
        return None
    measured = [
        row["train_step_s"] / (row["seq_len"] * r["batch_size"]) if row["train_step_s"] else None
        for row in rows
    ]
    flops = [row["flops_per_token"] for row in rows]
    top_m = max((m for m in measured if m is not None), default=None)
    top_f = max(flops)
    text = Text(
        "per-token cost vs T: measured time █, analytic FLOPs ░ (each scaled to its largest)\n",
        style="bold",
    )
    for row, m, f in zip(rows, measured, flops, strict=True):
        label = f"{row['seq_len']:>7,} "
        if m is not None and top_m:
            text.append(
                label + "█" * max(1, round(width * m / top_m)) + f" {human_seconds(m)}/token\n"
            )
        else:
            text.append(label + "(not measured)\n")
        text.append(
            " " * len(label)
            + "░" * max(1, round(width * f / top_f))
            + f" {human_count(f, 'FLOP')}/token\n",
            style="dim",
        )
    return text


def skipped_text(r: dict[str, Any]) -> Text | None:
    lines = [f"skipped: {s['what']}: {s['reason']}" for s in r["skipped"]]
    lines += [f"note: {n}" for n in r["notes"]]
    return Text("\n".join(lines), style="yellow") if lines else None


def render(r: dict[str, Any]) -> Group:
    """Every section of the report, in order, as one renderable."""
    parts: list[RenderableType | None] = [
        header(r),
        model_table(r),
        flops_table(r),
        memory_table(r),
        measured_table(r),
        attention_table(r),
        fit_table(r),
        scaling_table(r),
        scaling_chart(r),
        skipped_text(r),
    ]
    shown: list[RenderableType] = []
    for part in parts:
        if part is not None:
            shown += [part, Text("")]  # a blank line between sections
    return Group(*shown[:-1])
