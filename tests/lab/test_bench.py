"""The benchmarks produce their numbers (printed by `distillery bench`, never asserted)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import pipeline.lab.bench
import pipeline.lab.input_bench
import pipeline.lab.storage_bench
from flows.cli import app
from pipeline.lab.bench import bench_teacher_pass, model_flops
from pipeline.lab.storage_bench import StreamRates


def test_teacher_pass_benchmark_reports_both_throughputs() -> None:
    result = bench_teacher_pass("digits", "test_resnet", samples=40, views=1, batch_size=16, shard_size=24,
                                device="cpu", repeats=2)
    assert result.views == 2 and result.repeats == 2
    assert result.pass_images_per_s > 0 and result.bare_images_per_s > 0
    assert result.pass_over_bare == pytest.approx(result.pass_images_per_s / result.bare_images_per_s)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        bench_teacher_pass("digits", "test_resnet", samples=40, repeats=0)


@pytest.mark.slow
def test_bench_command_prints_the_pass_and_step_tables(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(pipeline.lab.bench, "STEP_CONFIGS", {"ce": (("ce",), False), "ce+kd": (("ce", "kd"), False)})
    monkeypatch.setattr(pipeline.lab.bench, "TCS_CONFIGS", {"ce+kd online": (("ce", "kd"), True),
                                                        "ce+tcs": (("ce", "tcs"), False)})
    monkeypatch.setattr(pipeline.lab.bench, "DDP_CONFIGS", ((1, None), (2, None)))
    # >= 5x test_resnet's FLOPs, faster than resnet50; quick takes the first only
    monkeypatch.setattr(pipeline.lab.bench, "TCS_TEACHERS", ("resnet10t", "resnet50"))
    monkeypatch.setattr(pipeline.lab.storage_bench, "SCALES", (1, 2))
    # The input pipeline's smallest folder (an image per class), no 12 MP photos, one small model.
    monkeypatch.setattr(pipeline.lab.bench, "bench_input_pipeline",
                        functools.partial(pipeline.lab.bench.bench_input_pipeline, n=10, photos=0))
    monkeypatch.setattr(pipeline.lab.input_bench, "MODELS", ("test_resnet",))
    monkeypatch.setattr(pipeline.lab.input_bench, "INPUT_MODES", {"encoded": {"inputs": "encoded"},
                                                                  "raw": {"inputs": "raw"}})
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--quick", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # table titles wrap at the console's width
    assert "teacher pass vs a bare forward loop" in result.output and "resnet10t" in result.output
    assert "ms / step" in result.output and "ce+kd" in result.output
    results = json.loads(out.read_text())
    assert [r["teacher"] for r in results["teacher_pass"]] == ["resnet10t"]
    rows = {r["config"]: r for r in results["student_steps"]["rows"]}
    assert set(rows) == {"ce", "ce+kd"}
    assert rows["ce"]["over_ce"] == 1.0 and rows["ce+kd"]["over_kd"] == 1.0
    assert all(r["step_ms"] > 0 and r["peak_rss_mb"] > 0 for r in rows.values())
    stream = results["student_steps"]["stream_samples_per_s"]
    assert stream > 0 and "the cache stream alone" in text
    assert all(r["stream_over_config"] == pytest.approx(stream / r["samples_per_s"]) for r in rows.values())
    [tcs_bench] = results["tcs_vs_online_kd"]
    tcs = {r["config"]: r for r in tcs_bench["rows"]}
    assert tcs_bench["teacher"] == "resnet10t" and "1.00 (1.00)" in text
    assert tcs_bench["teacher_over_student_flops"] >= 5
    assert tcs["ce+kd online"]["over_online_kd"] == 1.0 and tcs["ce+kd online"]["rss_over_online_kd"] == 1.0
    assert tcs["ce+kd online"]["run_rss_over_online_kd"] == 1.0 and "run's RSS" in text
    assert all(0 < r["run_rss_mb"] < r["peak_rss_mb"] for r in tcs.values())
    assert tcs["ce+tcs"]["over_online_kd"] == tcs["ce+tcs"]["step_ms"] / tcs["ce+kd online"]["step_ms"]
    first, *others = results["ddp"]["rows"]
    assert (first["processes"], first["over_one"]) == (1, 1.0) and "DDP: student test_resnet" in result.output
    assert 2 in {r["processes"] for r in others}
    assert all(r["over_one"] == r["samples_per_s"] / first["samples_per_s"] > 0 for r in others)
    storage = results["storage"]
    assert [r["samples"] for r in storage["rows"]] == [250, 500] and storage["rows"][0]["time_over_first"] == 1
    assert all(r["seconds"] > 0 and r["peak_rss_bytes"] > 0 for r in storage["rows"])
    assert storage["bytes"]["samples"] == 500 and "TinyViT's 4k+4 = 24" in result.output
    stream = storage["stream_samples_per_s"]
    assert list(stream) == ["format 2", "format 1"] and all(v > 0 for v in stream.values())
    assert storage["stream_format_2_over_1"] == pytest.approx(stream["format 2"] / stream["format 1"])
    assert f"{stream['format 2']:.0f} samples/s, its format-1 twin" in text
    inputs = results["inputs"]
    encoded, raw = inputs["bytes"]
    assert (encoded["mode"], raw["mode"]) == ("encoded", "raw")
    # The files' own bytes (tests/cache/test_inputs.py checks them byte for byte) plus the blocks' framing,
    # which ten small JPEGs do not amortise; raw pixels cost several times more.
    assert 1 < encoded["over_source"] < raw["over_source"] / 4
    assert [(r["device"], r["workers"]) for r in inputs["streams"]] == [("cpu", 0), ("cpu", inputs["cpus"])] * 2
    assert all(r["per_core"] > 0 for r in inputs["streams"]) and "cores to feed" in text
    assert [(r["model"], r["device"]) for r in inputs["models"]] == [("test_resnet", "cpu")]
    assert [[r["samples"] for r in s["rows"]] for s in inputs["scaling"]] == [[10, 20]]
    assert all(r["first_step_seconds"] > 0 for r in inputs["scaling"][0]["rows"]) and "train: first step" in text


def test_stream_rates_keep_the_json_keys_of_the_bench_file() -> None:
    rates = StreamRates(format_2=2.0, format_1=1.0)
    assert rates.model_dump(mode="json") == {"format 2": 2.0, "format 1": 1.0}
    assert StreamRates.model_validate({"format 2": 2.0, "format 1": 1.0}) == rates


def test_flops_grow_with_the_model() -> None:
    assert model_flops("resnet10t", 10, 1, 32) > 5 * model_flops("test_resnet", 10, 1, 32)
