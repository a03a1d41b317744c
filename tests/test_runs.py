"""`tformer runs`: every run found with its kind, unreadable runs said in their row, the loss
curves as the metrics file holds them, in the terminal and as a PNG."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers_eval import SEQ_LEN, eval_runs
from rich.console import Console

from tformer_cli.commands.charts import PALETTE, terminal_chart, write_png
from tformer_cli.commands.runcard import render_run_card
from tformer_cli.runs.catalog import describe_run, find_runs, loss_series


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _runs_json(cli, *args) -> dict[str, dict]:
    res = cli("runs", *args, "--json")
    assert res.exit_code == 0, res.stderr
    return {row["name"]: row for row in json.loads(res.stdout)}


def test_runs_lists_pretrain_lora_and_imported_runs_with_their_kinds(cli, monkeypatch):
    runs = eval_runs()
    monkeypatch.chdir(runs.root)
    rows = _runs_json(cli)  # the current folder, recursively
    assert {name: row["kind"] for name, row in rows.items()} == {
        "runs/pretrain": "pretrain",
        "runs/lora": "LoRA",
        "runs/imported": "imported",
    }  # not best/, not the token cache, not the exported Hugging Face directory
    pre, lora = rows["runs/pretrain"], rows["runs/lora"]
    card = runs.card
    assert pre["params"] == card["params"] and pre["tokens_seen"] == card["tokens_seen"]
    assert pre["best_val_bpb"] == card["best_val_bpb"] and pre["mfu"] == card["mfu"]
    assert lora["base"] == "runs/pretrain" and rows["runs/imported"]["base"] == "export/hf"
    assert rows["runs/imported"]["params"] == card["params"]
    res = cli("runs")
    assert res.exit_code == 0 and "runs/pretrain" in res.stdout and "LoRA" in res.stdout


def test_sort_and_json(cli):
    runs = eval_runs()
    res = cli("runs", runs.root / "runs", "--sort", "bpb", "--json")
    names = [r["name"] for r in json.loads(res.stdout)]
    assert names[0].endswith("pretrain")  # the only run with bits per byte comes first
    bad = cli("runs", runs.root, "--sort", "colour")
    assert bad.exit_code == 1 and "--sort" in bad.stderr and "bpb" in bad.stderr


def test_a_broken_run_card_makes_its_row_unreadable_and_the_others_still_show(cli, tmp_path):
    runs = eval_runs()
    shutil.copytree(runs.pretrain, tmp_path / "good")
    shutil.copytree(runs.pretrain, tmp_path / "broken")
    (tmp_path / "broken" / "run_card.json").write_text('{"steps": ')
    rows = _runs_json(cli, tmp_path)
    assert rows[str(tmp_path / "good")]["error"] is None
    assert "unreadable" in rows[str(tmp_path / "broken")]["error"]
    assert rows[str(tmp_path / "broken")]["kind"] == "pretrain"
    res = cli("runs", tmp_path)
    assert res.exit_code == 0 and "unreadable" in res.stdout
    assert "broken: run_card.json is unreadable" in res.stderr


def test_a_folder_without_runs_says_so_and_exits_0(cli, tmp_path):
    (tmp_path / "notes.txt").write_text("no runs here\n")
    res = cli("runs", tmp_path)
    assert res.exit_code == 0 and "no runs under" in res.stderr
    missing = cli("runs", tmp_path / "nope")
    assert missing.exit_code == 1 and "no such directory" in missing.stderr


def test_the_plotted_series_are_the_metrics_file(tmp_path):
    runs = eval_runs()
    records = _records(runs.pretrain)
    per_step = runs.card["batch_size"] * SEQ_LEN
    series = loss_series(runs.pretrain)
    assert series.train == [(r["step"] * per_step, r["loss"]) for r in records if "loss" in r]
    assert series.val == [(r["step"] * per_step, r["val_loss"]) for r in records if "val_loss" in r]
    timed = loss_series(runs.pretrain, x="time", y="bpb")
    scale = next(r["val_bpb"] / r["val_loss"] for r in records if "val_bpb" in r)
    assert not timed.time_estimated
    assert timed.train == [(r["elapsed"], r["loss"] * scale) for r in records if "loss" in r]
    assert [y for _, y in timed.val] == pytest.approx(
        [r["val_bpb"] for r in records if "val_bpb" in r]
    )
    # a run logged before "elapsed": times are the steps' share of the card's wall time
    old = shutil.copytree(runs.pretrain, tmp_path / "old")
    lines = [{k: v for k, v in r.items() if k != "elapsed"} for r in records]
    (old / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    estimated = loss_series(old, x="time")
    last, wall = records[-1]["step"], runs.card["wall_seconds"]
    assert estimated.time_estimated and estimated.train[-1][0] == pytest.approx(wall)
    assert estimated.train[0][0] == pytest.approx(records[0]["step"] / last * wall)


def test_the_terminal_chart_draws_the_series_and_names_each_run():
    runs = eval_runs()
    series = [loss_series(runs.pretrain, name="pre"), loss_series(runs.lora, name="lora")]
    chart = terminal_chart(series, width=90, height=22)
    for drawn, want in zip(chart.plotted, series, strict=True):
        assert drawn.name == want.name
        assert drawn.train == [pytest.approx(point) for point in want.train]
        assert drawn.val == [pytest.approx(point) for point in want.val]
    assert chart.plotted[0].color != chart.plotted[1].color
    assert "pre" in chart.plain and "lora" in chart.plain  # the legend
    r, g, b = PALETTE[1]
    assert f"\x1b[38;2;{r};{g};{b}m" in chart.text  # the second run's colour


def test_runs_plot_in_the_terminal_and_as_json(cli):
    runs = eval_runs()
    res = cli("runs", "--plot", runs.pretrain, runs.lora)
    assert res.exit_code == 0, res.stderr
    assert "tokens seen" in res.stdout and "lora" in res.stdout
    res = cli("runs", "--plot", runs.pretrain, "--y", "bpb", "--x", "time", "--json")
    (data,) = json.loads(res.stdout)
    assert data["y"] == "bpb" and data["x"] == "time" and len(data["val"]) == 2
    imported = cli("runs", "--plot", runs.imported)
    assert imported.exit_code == 1 and "metrics.jsonl" in imported.stderr


def test_the_png_has_the_requested_size_and_one_colour_per_run(cli, tmp_path):
    image = pytest.importorskip("matplotlib.image")
    runs = eval_runs()
    png = tmp_path / "curves.png"
    res = cli("runs", runs.pretrain, runs.lora, "--png", png, "--size", "640x400")
    assert res.exit_code == 0, res.stderr
    pixels = image.imread(png)  # height x width x RGBA, floats in [0, 1]
    assert pixels.shape[:2] == (400, 640)
    rgb = (pixels[..., :3] * 255).round()
    for colour in PALETTE[:2]:
        close = (abs(rgb - colour) <= 8).all(axis=-1)
        assert close.sum() > 50, colour
    assert not (abs(rgb - PALETTE[2]) <= 8).all(axis=-1).any()  # a third run's colour: absent
    bad = cli("runs", runs.pretrain, "--png", png, "--size", "huge")
    assert bad.exit_code == 1 and "--size" in bad.stderr


def test_write_png_draws_the_series_given(tmp_path):
    pytest.importorskip("matplotlib")
    runs = eval_runs()
    write_png([loss_series(runs.pretrain)], str(tmp_path / "one.png"), 300, 200)
    assert (tmp_path / "one.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_run_card_shows_a_small_loss_chart():
    runs = eval_runs()
    console = Console(record=True, width=80, color_system=None)
    render_run_card(runs.card, console)
    text = console.export_text()
    assert "best val loss" in text and "training (line), validation (dots)" in text
    assert "pretrain" in text.split("training (line)")[1]  # the legend under the title


def test_find_runs_skips_best_caches_and_hidden_folders(tmp_path):
    runs = eval_runs()
    found = find_runs([runs.root])
    assert sorted(p.name for p in found) == ["imported", "lora", "pretrain"]
    assert find_runs([runs.pretrain]) == [runs.pretrain]  # a run named directly
    row = describe_run(runs.imported)
    assert row.kind == "imported" and row.error is None and row.best_val_bpb is None
