"""Training-throughput benchmarks of the trainer (``eval/bench_train.py`` is the command line).

Three parts, each written as markdown tables to ``docs/benchmarks.md``:

A. ``tiny``: steps/s and peak memory of every method on the built-in tiny model, a baseline per method
   plus one-factor variations (latent/text cache, gradient checkpointing, 8-bit AdamW).
B. ``sd15`` (and ``sdxl``): LoRA on a random-weight model of SD 1.5's (SDXL's) exact architecture,
   saved to a folder as a stock diffusers pipeline and loaded by the trainer like any local model;
   cache off vs on (the cache skips the VAE and the text encoder on every step).
C. ``overhead``: ``Trainer`` steps against a bare hand-written PyTorch loop doing the same math on the
   same modules and the same batch, interleaved in one process; the median of per-round ratios.

Every configuration of A and B runs in a fresh subprocess (``python -m personalize.perf --worker``),
so its peak memory (``ru_maxrss`` / ``VmHWM``; ``torch.cuda.max_memory_allocated`` on CUDA) is its own.
Warm-up steps are excluded from every timing.

The package:

- ``cases``: :class:`BenchSettings` and :func:`plan_cases` (the configurations and their overrides);
- ``measure``: memory helpers, :func:`measure_case`, :class:`BareLoop` and :func:`measure_overhead`;
- ``models``: the random-weight SD 1.5 / SDXL pipelines, threads, :func:`worker_main` / :func:`run_worker`;
- ``report``: :class:`Report`, :func:`merge_passes`, :func:`environment`, the markdown tables and page;
- here: :func:`run_benchmark`, which runs the parts and writes the page; ``__main__``: the worker command.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from personalize.perf.cases import (METHODS, PARTS, ROOT, TINY_RECIPES, VARIATION_LABELS, VARIATIONS,
                                     BenchSettings, _data_overrides, plan_cases)
from personalize.perf.measure import BareLoop, measure_case, measure_overhead
from personalize.perf.models import (RESULT_MARK, WORKERS, set_threads, build_random_model, run_worker,
                                      sd15_configs, sdxl_configs, worker_main)
from personalize.perf.report import (Report, loadavg, environment, merge_passes, overhead_table, print_summary,
                                      render_markdown, sd_table, tiny_table)

__all__ = ["METHODS", "PARTS", "ROOT", "RESULT_MARK", "TINY_RECIPES", "VARIATIONS", "VARIATION_LABELS", "WORKERS",
           "BareLoop", "BenchSettings", "Report", "build_random_model", "environment", "measure_case",
           "measure_overhead", "merge_passes", "overhead_table", "plan_cases", "print_summary", "render_markdown",
           "run_benchmark", "run_worker", "sd15_configs", "sd_table", "sdxl_configs", "tiny_table", "worker_main"]


def run_benchmark(settings: BenchSettings, log: Callable[[str], None] = print) -> Report:
    """Run the parts named by ``settings``; write the markdown report if ``settings.output`` is set."""
    start = time.perf_counter()
    if settings.cuda:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch sees no CUDA device")
    if not settings.isolate:
        set_threads(settings.threads)
    report = Report(settings=dataclasses.asdict(settings), environment=environment(settings.device))
    if settings.threads:
        report.environment["torch_threads"] = settings.threads
    own_work = settings.work_dir is None
    work = Path(settings.work_dir or tempfile.mkdtemp(prefix="personalize-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model_root = Path(settings.model_dir) if settings.model_dir else work / "models"
    try:
        cases = plan_cases(settings, work)
        for model in ("sd15", "sdxl"):
            if any(c["model"] == model for c in cases) or (model == "sd15" and "overhead" in settings.parts()
                                                            and settings.overhead_base == "sd15"):
                log(f"building a random-weight {model} pipeline in {model_root / model} ...")
                info = run_worker({"kind": "build", "model": model, "out_dir": str(model_root / model),
                                   "device": settings.device}, settings, log)
                report.models[model] = info
                log(f"  {'reused' if info['reused'] else 'built'} ({info['build_s']:.0f} s to build)")
        passes = settings.passes()
        runs: dict[str, list[dict]] = {}
        total = len(cases) * passes
        for n in range(passes):  # every pass runs every configuration; odd passes in reverse order
            for case in (cases if n % 2 == 0 else cases[::-1]):
                spec = dict(case, kind="case", work_dir=str(work))
                if case["model"] in ("sd15", "sdxl"):
                    spec["base"] = str(model_root / case["model"])
                done = sum(len(v) for v in runs.values()) + sum(f.startswith(case["label"] + ":") for f in
                                                                report.failures)
                log(f"[{done + 1}/{total}] {case['label']}{f' (pass {n + 1})' if passes > 1 else ''} ...")
                t0 = time.perf_counter()
                try:
                    result = run_worker(spec, settings, log)
                except (RuntimeError, subprocess.TimeoutExpired) as err:
                    report.failures.append(f"{case['label']}: {err}")
                    log(f"  FAILED: {err}")
                    continue
                runs.setdefault(case["label"], []).append(result)
                log(f"  {result['steps_per_s']:.3g} steps/s, median {result['median_ms']:.1f} ms/step, "
                    f"peak RSS {result['peak_rss_mib']:.0f} MiB ({time.perf_counter() - t0:.0f} s)")
        report.cases = [merge_passes(runs[c["label"]]) for c in cases if c["label"] in runs]
        if "overhead" in settings.parts():
            _run_overhead(settings, report, work, model_root, log)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
        elif not settings.model_dir:
            shutil.rmtree(model_root, ignore_errors=True)
    report.environment["load_after"] = loadavg()
    report.wall_s = time.perf_counter() - start
    if settings.output:
        path = Path(settings.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_markdown(report))
    return report


def _run_overhead(settings: BenchSettings, report: Report, work: Path, model_root: Path,
                  log: Callable[[str], None]) -> None:
    """Part C: the trainer's loop against a bare PyTorch loop, in one worker process."""
    warmup, rounds, window = settings.overhead_plan()
    resolution = settings.tiny_resolution if settings.overhead_base == "tiny-sd" else settings.sd_resolution("sd15")
    spec = dict(kind="overhead", recipe="tiny/lora", device=settings.device, work_dir=str(work),
                warmup=warmup, rounds=rounds, window=window, model=settings.overhead_base,
                resolution=resolution,
                overrides=["train.report_to=none", "train.progress_bar=false", "train.checkpoint_every=0",
                           "validation.prompts=[]", "data.cache=false", "train.batch_size=2",
                           f"train.mixed_precision='{settings.precision()}'",
                           *_data_overrides("tiny/lora", resolution)])
    if settings.overhead_base == "sd15":
        spec["base"] = str(model_root / "sd15")
    log(f"trainer overhead vs a bare loop ({rounds} rounds x {window} steps) ...")
    try:
        report.overhead = run_worker(spec, settings, log)
        o = report.overhead
        log(f"  trainer {o['median_ms']['trainer']:.1f} ms/step, bare {o['median_ms']['bare']:.1f} ms/step, "
            f"overhead {o['overhead_pct']:+.1f} %")
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        report.failures.append(f"overhead: {err}")
        log(f"  FAILED: {err}")
