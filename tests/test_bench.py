"""Smoke tests of the training benchmark (personalize/perf/, eval/bench_train.py) at tiny settings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from personalize import perf as bench


def _section_table(markdown: str, heading: str) -> tuple[list[str], list[list[str]]]:
    """The first markdown table after the heading that starts with ``heading``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    header, rule, *body = rows
    assert set("".join(rule)) <= set("-:")
    return header, body


def _number(cell: str) -> float:
    return float(cell.replace(",", "").replace("×", "").replace("%", "").strip())


def test_tiny_and_overhead_in_process(tmp_path):
    out = tmp_path / "benchmarks.md"
    settings = bench.BenchSettings(only=["tiny", "overhead"], methods=["lora", "textual_inversion"],
                                   variations=["baseline", "cache"], steps=2, warmup=1, overhead_rounds=2,
                                   overhead_window=1, threads=1, repeats=1, isolate=False,
                                   work_dir=str(tmp_path / "work"),
                                   output=str(out), command="pytest")
    report = bench.run_benchmark(settings, log=lambda _: None)
    assert not report.failures
    assert [(c["method"], c["variation"]) for c in report.cases] == [
        ("lora", "baseline"), ("lora", "cache"), ("textual_inversion", "baseline"), ("textual_inversion", "cache")]
    for case in report.cases:
        assert case["steps_per_s"] > 0 and case["ms_per_step"] > 0 and len(case["step_ms"]) == 2
        assert case["peak_rss_mib"] > 0 and case["images_per_step"] == 2

    text = out.read_text()
    assert "Command: `pytest`" in text and "| CPU |" in text and "| date |" in text
    header, rows = _section_table(text, "## A.")
    assert header[:6] == ["method", "variation", "img/step", "steps/s", "median ms/step", "× baseline"]
    assert "peak RSS (MiB)" in header
    assert [r[:2] for r in rows] == [["lora", "baseline"], ["lora", "+ cache"],
                                     ["textual_inversion", "baseline"], ["textual_inversion", "+ cache"]]
    for row in rows:
        assert len(row) == len(header)
        steps_per_s, ms, peak = _number(row[3]), _number(row[4]), _number(row[header.index("peak RSS (MiB)")])
        assert steps_per_s > 0 and ms > 0 and peak > 0
        assert _number(row[5]) > 0

    header, rows = _section_table(text, "## C.")
    assert header[:3] == ["loop", "median ms/step", "steps/s"]
    assert [r[0] for r in rows] == ["bare PyTorch loop", "Trainer (same batch)",
                                    "Trainer fed by its DataLoader (PNG decode + resize per step)",
                                    "bare PyTorch loop again, a second instance (noise floor)"]
    for row in rows:
        assert _number(row[1]) > 0 and _number(row[2]) > 0
    overhead = report.overhead
    assert set(overhead["median_ms"]) == {"bare", "trainer", "trainer_dataloader", "bare_again"}
    assert all(len(v) == 2 for v in overhead["round_ms"].values())
    assert len(overhead["extras_us"]) >= 5


def test_one_configuration_in_a_fresh_process(tmp_path):
    settings = bench.BenchSettings(only=["tiny"], methods=["lora"], variations=["baseline"], steps=1, warmup=1,
                                   repeats=1,
                                   threads=1, work_dir=str(tmp_path), output=None)
    report = bench.run_benchmark(settings, log=lambda _: None)
    assert not report.failures
    (case,) = report.cases
    assert case["steps_per_s"] > 0 and case["torch_threads"] == 1
    assert case["peak_rss_mib"] >= case["rss_setup_mib"] > case["rss_start_mib"] > 0
    assert case["step_peak_rss_mib"] > 0 and case["rss_rest_mib"] > 0


@pytest.mark.parametrize("model, expected", [
    ("sd15", {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}),
    ("sdxl", {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}),
])
def test_random_sd_configs_have_the_real_sizes(model, expected):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = bench.sd15_configs() if model == "sd15" else bench.sdxl_configs()
    with torch.device("meta"):  # shapes only, no memory
        modules = {"unet": UNet2DConditionModel(**configs["unet"]), "vae": AutoencoderKL(**configs["vae"]),
                   "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))}
        if model == "sdxl":
            modules["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    assert {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()} == expected


def test_merge_passes_keeps_the_fastest_timing_and_the_highest_peak():
    runs = [dict(label="x", median_ms=12.0, steps_per_s=80.0, peak_rss_mib=900.0, step_delta_mib=5.0),
            dict(label="x", median_ms=10.0, steps_per_s=95.0, peak_rss_mib=880.0, step_delta_mib=7.0)]
    merged = bench.merge_passes(runs)
    assert merged["median_ms"] == 10.0 and merged["steps_per_s"] == 95.0
    assert merged["peak_rss_mib"] == 900.0 and merged["step_delta_mib"] == 7.0
    assert merged["pass_median_ms"] == [12.0, 10.0]


def test_plan_defaults():
    cpu = bench.BenchSettings()
    assert cpu.parts() == ["tiny", "sd15", "overhead"] and cpu.passes() == 2
    cases = bench.plan_cases(cpu, bench.ROOT)
    assert len([c for c in cases if c["part"] == "tiny"]) == len(bench.METHODS) * len(bench.VARIATIONS)
    sd = [c for c in cases if c["part"] == "sd15"]
    assert [c["cache"] for c in sd] == [False, True] and all(c["resolution"] == 64 for c in sd)
    gpu = bench.BenchSettings(device="cuda")
    assert gpu.parts() == ["tiny", "sd15", "sdxl", "overhead"]
    assert gpu.sd_resolution("sd15") == 512 and gpu.sd_resolution("sdxl") == 1024
    gpu_cases = [c for c in bench.plan_cases(gpu, bench.ROOT) if c["part"] == "sdxl"]
    assert any("train.optimizer=adamw8bit" in c["overrides"] and "train.gradient_checkpointing=true" in c["overrides"]
               for c in gpu_cases)


def test_eval_script_help():
    proc = subprocess.run([sys.executable, "eval/bench_train.py", "--help"], capture_output=True, text=True,
                          timeout=60, cwd=str(bench.ROOT))
    assert proc.returncode == 0
    for flag in ("--quick", "--only", "--resolution", "--steps", "--device"):
        assert flag in proc.stdout


def test_replace_section_appends_then_replaces_in_place(tmp_path):
    from personalize.perf.report import replace_section

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nkept\n")
    replace_section(doc, "<!-- a -->", "<!-- /a -->", "<!-- a -->\nfirst\n<!-- /a -->")
    doc.write_text(doc.read_text() + "\ntail\n")
    replace_section(doc, "<!-- a -->", "<!-- /a -->", "<!-- a -->\nsecond\n<!-- /a -->")
    text = doc.read_text()
    assert text == "# Benchmarks\n\nkept\n\n<!-- a -->\nsecond\n<!-- /a -->\n\ntail\n"
