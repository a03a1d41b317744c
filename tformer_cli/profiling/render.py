"""Rich tables (and a small bar chart) for a profile report; builds renderables, prints nothing."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from models.config import ModelConfig
from tformer_cli.profiling.analytic import attention_memory
from tformer_cli.units import human_bytes, human_count, human_seconds

METHOD_NAMES = {
    "cuda_max_allocated": "CUDA max allocated",
    "rss_hwm": "peak RSS growth",
    "ru_maxrss": "ru_maxrss growth (a lower bound)",
}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _table(
    title: str,
    columns: tuple[str, ...],
    rows: list[tuple[str, ...]],
    caption: str | None = None,
    left: tuple[int, ...] = (0,),
    total: tuple[str, ...] | None = None,
) -> Table:
    """Numbers right-aligned, the columns in `left` (labels, prose) left-aligned; total is a last
    row in bold."""
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for i, col in enumerate(columns):
        table.add_column(
            col, justify="left" if i in left else "right", style="bold" if i == 0 else None
        )
    for row in rows:
        table.add_row(*row)
    if total:
        table.add_row(*total, style="bold")
    return table


def header(r: dict[str, Any]) -> Text:
    """The first line: which model, on which device, at which precision and (B, T)."""
    m = r["model"]
    return Text.from_markup(
        f"[bold]tformer profile[/]: {m['source']} [bold]{m['label']}[/] on {r['device']} "
        f"({r['device_name']}, {r['threads']} threads), {r['precision']}, "
        f"batch {r['batch_size']} x T={r['seq_len']}" + (" [dim](quick)[/]" if r["quick"] else "")
    )


def model_table(r: dict[str, Any]) -> Table:
    """1. Parameters by component, and their bytes."""
    counts, total, b = r["params_by_component"], r["params"], r["bytes_per_element"]
    tied = r["model"]["config"]["tie_embeddings"]
    caption = f"bytes at {r['precision']} ({b} per parameter)"
    if r.get("checkpoint_params") is not None:
        same = "matches" if r["checkpoint_params"] == total else "DIFFERS from"
        caption += (
            f"; the checkpoint stores {r['checkpoint_params']:,} elements, which {same} the count"
        )
    rows = [
        (
            name + (" (tied to the embeddings)" if name == "head" and tied else ""),
            f"{n:,}",
            _pct(n / total),
            human_bytes(n * b),
        )
        for name, n in counts.items()
    ]
    columns = ("component", "parameters", "share", "bytes")
    total_row = ("total", f"{total:,}", "100%", human_bytes(r["param_bytes"]))
    return _table("1. Model: parameters", columns, rows, caption=caption, total=total_row)


def flops_table(r: dict[str, Any]) -> Table:
    """2a. Analytic FLOPs per token by part, forward and forward + backward."""
    f, T, B = r["flops_forward_per_token"], r["seq_len"], r["batch_size"]
    cross = r["attention_crossover_seq_len"]
    caption = (
        f"6N rule: {human_count(r['six_n_flops_per_token'], 'FLOP')}/token; "
        f"with the attention term at T={T}: {human_count(r['flops_per_token'], 'FLOP')}. "
        f"Attention (projections + scores) passes the MLP at T >= {cross['attention']:,}, "
        f"the T-dependent scores alone at T >= {cross['scores']:,}. Scores count the full "
        "T x T square (PaLM's convention, as MFU does); causal kernels can skip about half."
    )
    fwd = r["flops_per_token_forward"]
    parts = [
        ("attention: projections", f["attention_proj"]),
        ("attention: scores (x T)", f["attention_scores"]),
        ("MLP", f["mlp"]),
        ("head", f["head"]),
    ]
    rows = [
        (name, human_count(n), human_count(3 * n), _pct(n / fwd), human_count(3 * n * T * B))
        for name, n in parts
    ]
    total = (
        "total",
        human_count(fwd),
        human_count(r["flops_per_token"]),
        "100%",
        human_count(r["flops_per_step"]),
    )
    columns = ("part", "forward", "forward+backward", "share", f"fwd+bwd per step (B={B})")
    title = f"2a. Analytic FLOPs per token at T={T}"
    return _table(title, columns, rows, caption=caption, total=total)


def memory_table(r: dict[str, Any]) -> Table:
    """2b. Analytic memory of training (AdamW) beside inference (KV cache)."""
    tm, im, T, B = r["train_memory"], r["inference_memory"], r["seq_len"], r["batch_size"]
    kv_note = (
        f"KV cache = 2 x L x n_kv_heads x head_dim x T x B x {r['bytes_per_element']} bytes = "
        f"{human_bytes(r['kv_cache_bytes'])} "
        f"({human_bytes(r['kv_cache_bytes_per_token'])} per token)"
    )
    saving = r["kv_cache_gqa_saving"]
    kv_note += (
        f"; grouped-query attention makes it {saving:.1f}x smaller than with one key/value head "
        f"per query head ({human_bytes(r['kv_cache_bytes_mha'])})"
        if saving > 1
        else "; no GQA (one key/value head per query head)"
    )
    math = human_bytes(r["train_memory_math"]["total"])
    caption = kv_note + f". Math attention would make training {math}."
    train = [
        ("weights (fp32 master)", tm["weights"]),
        ("gradients", tm["grads"]),
        ("AdamW moments", tm["optimizer"]),
        ("activations", tm["activations"]),
        ("backward transient", tm["transient"]),
    ]
    inference = [
        (f"weights ({r['precision']})", im["weights"]),
        ("KV cache", im["kv_cache"]),
        ("prefill workspace", im["workspace"]),
    ]
    inference += [("", None)] * (len(train) - len(inference))
    rows = [
        (name, human_bytes(n), rname, human_bytes(rn) if rn is not None else "")
        for (name, n), (rname, rn) in zip(train, inference, strict=True)
    ]
    total = ("total", human_bytes(tm["total"]), "total", human_bytes(im["total"]))
    columns = ("training (AdamW)", "bytes", "inference", "bytes")
    title = f"2b. Analytic memory at B={B}, T={T}"
    return _table(title, columns, rows, caption=caption, left=(0, 2), total=total)


def measured_table(r: dict[str, Any]) -> Table | None:
    """3. What was measured on the device (None when nothing was)."""
    m = r.get("measured") or {}
    if not m:
        return None
    T = r["seq_len"]
    method = METHOD_NAMES.get(m.get("memory_method") or "", "not measurable on this device")
    rows = [
        (
            "matmul peak",
            human_count(m["matmul_peak_flops"], "FLOP/s"),
            f"{r['precision']} dense matmul",
        ),
        (
            "memory bandwidth",
            f"{human_bytes(m['memory_bandwidth_bytes_per_s'])}/s",
            "large copy, read + write",
        ),
        *_training_rows(r, (m.get("train") or {}).get(str(T))),
        *_inference_rows(r, m.get("inference")),
    ]
    return _table(
        f"3. Measured on this device at B={r['batch_size']}, T={T}",
        ("what", "value", "detail"),
        rows,
        caption=(
            f"medians after warm-up; peak memory is {method} over the workload, weights included"
        ),
        left=(0, 2),
    )


def _peak_memory_row(measured: dict[str, Any], analytic: dict[str, int]) -> tuple[str, ...]:
    """A workload's measured peak memory beside the analytic figure."""
    peak = human_bytes(measured["peak_memory_bytes"])
    return ("  peak memory", peak, f"analytic {human_bytes(analytic['total'])}")


def _training_rows(r: dict[str, Any], train: dict[str, Any] | None) -> list[tuple[str, ...]]:
    if not train:
        return []
    speed = f"{train['tokens_per_s']:,.0f} tokens/s, MFU {_pct(train['mfu'])}"
    return [
        ("training step", human_seconds(train["step_s"]), speed),
        _peak_memory_row(train, r["train_memory"]),
    ]


def _inference_rows(r: dict[str, Any], inf: dict[str, Any] | None) -> list[tuple[str, ...]]:
    if not inf:
        return []
    util = r.get("decode_bandwidth_utilization")
    read = f"{human_bytes(r['decode_bytes_per_step'])} of weights + KV cache read per step"
    if util is not None:
        read += f", {_pct(util)} of the measured bandwidth"
    no_cache = (
        f"recomputes {r['seq_len']} positions per token; "
        f"the cache is {r['decode_cache_speedup']:,.1f}x faster"
    )
    return [
        (
            "prefill",
            f"{inf['prefill_tokens_per_s']:,.0f} tokens/s",
            human_seconds(inf["prefill_s"]),
        ),
        (
            "decode, KV cache",
            f"{inf['decode_tokens_per_s']:,.1f} tokens/s",
            f"{human_seconds(inf['decode_step_s'])} per step",
        ),
        ("decode, no cache", f"{inf['decode_tokens_per_s_no_cache']:,.1f} tokens/s", no_cache),
        ("decode bandwidth", f"{human_bytes(r['decode_bandwidth_bytes_per_s'])}/s", read),
        _peak_memory_row(inf, r["inference_memory"]),
    ]


def attention_table(r: dict[str, Any]) -> Table | None:
    """3b. The attention implementations side by side (None when not measured)."""
    att = (r.get("measured") or {}).get("attention") or {}
    if not any(att.values()):
        return None
    cfg = ModelConfig.from_dict(r["model"]["config"])
    T, B = r["seq_len"], r["batch_size"]
    rows = []
    for impl, res in att.items():
        analytic_bytes = human_bytes(attention_memory(cfg, T, B, r["precision"], impl))
        if res:
            time, peak = human_seconds(res["seconds"]), human_bytes(res["peak_memory_bytes"])
            rows.append((impl, time, peak, analytic_bytes))
        else:
            rows.append((impl, "skipped", "-", analytic_bytes))
    return _table(
        f"3b. Attention implementations at T={T} (one layer, forward + backward)",
        ("implementation", "time", "peak memory", "analytic memory"),
        rows,
        caption=(
            "sdpa: the fused kernel, O(T) memory; "
            "math: softmax(q k^T) v with the T x T matrix materialised"
        ),
    )


def quantization_table(r: dict[str, Any]) -> Table | None:
    """3c. The quantized weights next to fp32 (None without --quantize)."""
    qz = r.get("quantization")
    if not qz:
        return None
    scheme = qz["scheme"]
    rows = [
        (
            "weights read per token",
            human_bytes(qz["fp32_weight_bytes_per_token"]),
            human_bytes(qz["weight_bytes_per_token"]),
            f"{qz['bytes_ratio']:.2f}x",
        )
    ]
    if qz["decode_speedup"]:
        fp32, ours = qz["fp32_decode_tokens_per_s"], qz["decode_tokens_per_s"]
        speedup = f"{qz['decode_speedup']:.2f}x"
        rows.append(("decode", f"{fp32:,.1f} tokens/s", f"{ours:,.1f} tokens/s", speedup))
    quality, caption = qz["quality"], "quality not measured (--no-measure)"
    if quality:
        change = f"{100 * quality['loss_change']:+.2f}%"
        rows += [
            ("loss", f"{quality['loss_fp32']:.4f}", f"{quality[f'loss_{scheme}']:.4f}", change),
            ("same top-1 token", "", _pct(quality["top1_agreement"]), ""),
            ("KL(fp32 || int8)", "", f"{quality['kl_nats_per_token']:.5f} nats/token", ""),
        ]
        caption = (
            f"quality on {quality['text']}: {quality['tokens']:,} next-token predictions "
            f"(a uniform guess scores a loss of {quality['uniform_loss']:.2f})"
        )
    return _table(
        f"3c. {scheme} weights next to fp32",
        ("what", "fp32", scheme, "change"),
        rows,
        caption=caption,
    )


def fit_table(r: dict[str, Any]) -> Table:
    """4. Whether training and inference fit in free memory, and the largest B and T that do."""
    fit, T, B = r["fit"], r["seq_len"], r["batch_size"]
    caption = "free memory unknown on this device"
    if fit["budget_bytes"]:
        budget, free = human_bytes(fit["budget_bytes"]), human_bytes(fit["free_bytes"])
        caption = f"budget {budget} = {fit['headroom']:.0%} of the {free} free now"
    if fit["notes"]:
        caption += "\n" + "\n".join(f"note: {n}" for n in fit["notes"])
    rows = []
    for mode in ("train", "inference"):
        e = fit[mode]
        fits = "-" if "fits" not in e else ("yes" if e["fits"] else "[red]no[/]")
        most_b = f"{e['max_batch_size']:,}" if "max_batch_size" in e else "-"
        most_t = f"{e['max_seq_len']:,}" if "max_seq_len" in e else "-"
        rows.append((mode, human_bytes(e["bytes"]), fits, most_b, most_t))
    columns = (
        "mode",
        f"needs at B={B}, T={T}",
        "fits",
        f"largest batch at T={T}",
        f"largest T at B={B}",
    )
    return _table(f"4. Will it fit? ({r['precision']})", columns, rows, caption=caption)


def scaling_table(r: dict[str, Any]) -> Table | None:
    """5. The training step across context lengths (None for a single T)."""
    rows = r["scaling"]
    if len(rows) < 2:
        return None
    ref = next((row["seq_len"] for row in reversed(rows) if row["train_step_s"]), None)
    predicted = f"predicted: the step at T={ref:,} scaled by analytic FLOPs" if ref else None
    caption = (predicted or "not measured") + "; memory: weights, grads, AdamW, activations (sdpa)"
    cells = [
        (
            f"{row['seq_len']:,}",
            human_count(row["flops_per_step"]),
            _pct(row["attention_flops_share"]),
            human_seconds(row["train_step_s"]),
            human_seconds(row["predicted_step_s"]),
            _pct(row["mfu"]),
            human_bytes(row["train_memory_bytes"]),
            human_bytes(row["train_peak_memory_bytes"]),
        )
        for row in rows
    ]
    columns = ("T", "FLOP/step", "attn share", "time", "predicted", "MFU")
    columns += ("mem analytic", "mem measured")
    title = f"5. Scaling with T (training step, B={r['batch_size']})"
    return _table(title, columns, cells, caption=caption)


def scaling_chart(r: dict[str, Any], width: int = 40) -> Text | None:
    """Time per token, measured (█) against the analytic FLOPs per token (░), each scaled to its
    largest."""
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
    """What was skipped and why, and the notes (None when there are none)."""
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
        quantization_table(r),
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
