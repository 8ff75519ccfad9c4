"""The report: :class:`Report`, :func:`merge_passes` (one row from several passes), the
:func:`environment` (machine, software, load) and the markdown tables and page (:func:`render_markdown`,
:func:`print_summary`)."""

from __future__ import annotations

import datetime
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from personalize.perf.cases import VARIATION_LABELS


@dataclass
class Report:
    settings: dict
    environment: dict
    cases: list[dict] = field(default_factory=list)
    models: dict = field(default_factory=dict)
    overhead: Optional[dict] = None
    failures: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def merge_passes(results: list[dict]) -> dict:
    """One row from several passes of a configuration: the timing of the fastest pass (the one least
    disturbed by other processes), the highest memory peaks of all."""
    best = dict(min(results, key=lambda r: r["median_ms"]))
    best["pass_median_ms"] = [r["median_ms"] for r in results]
    for key in ("peak_rss_mib", "step_delta_mib", "gpu_peak_mib"):
        values = [r[key] for r in results if r.get(key) is not None]
        if values:
            best[key] = max(values)
    return best


def environment(device: str) -> dict:
    import torch

    cpu, logical = platform.processor() or platform.machine(), os.cpu_count()
    try:
        info = Path("/proc/cpuinfo").read_text()
        names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
        cpu, logical = (names[0] if names else cpu), len(names) or logical
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (AttributeError, ValueError, OSError):
        memory = None
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    env = {"cpu": cpu, "cores": logical, "usable_cores": usable, "memory_gib": memory,
           "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "date": now, "device": device, "load_before": loadavg()}
    for name in ("diffusers", "transformers", "accelerate", "peft", "bitsandbytes"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - reporting only
            env[name] = "not installed"
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def loadavg() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "–"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def _memory_columns(cuda: bool) -> list[str]:
    cols = ["peak RSS (MiB)", "step peak over resting RSS (MiB)"]
    return (["GPU peak (MiB)", "GPU resting (MiB)"] + cols) if cuda else cols


def _memory_cells(r: dict, cuda: bool) -> list[str]:
    cells = [_fmt(r.get("peak_rss_mib")), _fmt(r.get("step_delta_mib"))]
    return ([_fmt(r.get("gpu_peak_mib")), _fmt(r.get("gpu_rest_mib"))] + cells) if cuda else cells


def tiny_table(cases: list[dict], cuda: bool = False) -> tuple[list[str], list[list]]:
    header = ["method", "variation", "img/step", "steps/s", "median ms/step", "× baseline", *_memory_columns(cuda),
              "trainable params"]
    rows = []
    baselines = {c["method"]: c for c in cases if c["variation"] == "baseline"}
    for c in cases:
        base = baselines.get(c["method"])
        speed = f"{base['median_ms'] / c['median_ms']:.2f}×" if base else "–"
        rows.append([c["method"], VARIATION_LABELS.get(c["variation"], c["variation"]), c["images_per_step"],
                     _fmt(c["steps_per_s"]), _fmt(c["median_ms"]), speed, *_memory_cells(c, cuda),
                     f"{c['trainable_params']:,}"])
    return header, rows


def sd_table(cases: list[dict], cuda: bool = False) -> tuple[list[str], list[list]]:
    header = ["model", "px", "optimizer / options", "cache", "img/step", "median s/step", "steps/s", "cache speed-up",
              *_memory_columns(cuda)]
    rows = []
    for c in cases:
        twin = next((o for o in cases if o["model"] == c["model"] and o["variation"] == c["variation"]
                     and o["resolution"] == c["resolution"] and not o["cache"]), None)
        speed = f"{twin['median_ms'] / c['median_ms']:.2f}×" if c["cache"] and twin else "–"
        rows.append([c["model"], c["resolution"], c["variation"], "on" if c["cache"] else "off", c["images_per_step"],
                     f"{c['median_ms'] / 1000:.2f}", _fmt(c["steps_per_s"]), speed, *_memory_cells(c, cuda)])
    return header, rows


def overhead_table(o: dict) -> tuple[list[str], list[list]]:
    header = ["loop", "median ms/step", "steps/s", "vs bare loop (median of per-round ratios)"]
    med = o["median_ms"]
    rows = [["bare PyTorch loop", f"{med['bare']:.1f}", _fmt(1000 / med["bare"]), "–"],
            ["Trainer (same batch)", f"{med['trainer']:.1f}", _fmt(1000 / med["trainer"]), f"{o['overhead_pct']:+.1f} %"],
            ["Trainer fed by its DataLoader (PNG decode + resize per step)", f"{med['trainer_dataloader']:.1f}",
             _fmt(1000 / med["trainer_dataloader"]), f"{o['overhead_dataloader_pct']:+.1f} %"]]
    if "bare_again" in med:
        rows.append(["bare PyTorch loop again, a second instance (noise floor)", f"{med['bare_again']:.1f}",
                     _fmt(1000 / med["bare_again"]), f"{o['noise_floor_pct']:+.1f} %"])
    return header, rows


def _passes_text(settings: dict) -> str:
    n = settings.get("repeats") or (1 if settings["quick"] or settings["device"] == "cuda" else 2)
    if n == 1:
        return ""
    return (f"; {n} passes over all configurations (every other one in reverse order), a row showing the "
            f"timing of its fastest pass (the least disturbed by other processes) and the highest memory peaks")


def _passes_details(cases: list[dict]) -> list[str]:
    if not any(len(c.get("pass_median_ms", [])) > 1 for c in cases):
        return []
    lines = ["<details><summary>median ms/step of each pass</summary>", ""]
    lines += [f"- {c['label']}: " + ", ".join(f"{t:.1f}" for t in c["pass_median_ms"]) for c in cases]
    return lines + ["", "</details>", ""]


def render_markdown(report: Report) -> str:
    """docs/benchmarks.md: the environment, then parts A (tiny methods), B (SD-architecture LoRA), C (trainer
    overhead), the notes and any failures."""
    s, env = report.settings, report.environment
    cuda = s["device"] == "cuda"
    out = ["# Training benchmarks", "",
           "Generated by `eval/bench_train.py` (library code: `personalize/perf/`). Re-run it to refresh this page.",
           "", f"Command: `{s['command'] or 'python eval/bench_train.py'}`", "",
           "| | |", "|---|---|",
           f"| date | {env['date']} |",
           f"| CPU | {env['cpu']}, {env['cores']} logical cores ({env['usable_cores']} usable), "
           f"{env.get('memory_gib')} GiB RAM |"]
    if cuda:
        out.append(f"| GPU | {env.get('gpu')} ({env.get('gpu_memory_gib')} GiB) |")
    out += [f"| device | {env['device']} (torch threads: {env['torch_threads']}) |",
            f"| software | Python {env['python']}, torch {env['torch']}, diffusers {env['diffusers']}, "
            f"transformers {env['transformers']}, accelerate {env['accelerate']}, peft {env['peft']}, "
            f"bitsandbytes {env['bitsandbytes']} |",
            f"| platform | {env['platform']} |",
            f"| load average (1/5/15 min) before / after | {env.get('load_before')} / {env.get('load_after')} |",
            f"| mixed precision | {s['mixed_precision'] or ('bf16' if cuda else 'no')} |",
            f"| whole run | {report.wall_s / 60:.1f} min |", ""]
    out += _tiny_section(report, cuda) + _model_sections(report, cuda) + _overhead_section(report)
    out += _notes_section(cuda) + _failures_section(report)
    return "\n".join(out)


def _tiny_section(report: Report, cuda: bool) -> list[str]:
    """Part A: the methods on the built-in tiny model."""
    s = report.settings
    out: list[str] = []
    tiny = [c for c in report.cases if c["part"] == "tiny"]
    if tiny:
        c0 = tiny[0]
        out += ["## A. Methods on the tiny model", "",
                f"Built-in `tiny-sd` (random weights, SD 1.x architecture at ~1 M U-Net parameters), "
                f"{c0['resolution']} px, the shipped `recipes/tiny/*.yaml` recipes (batch as in the recipe; DreamBooth "
                f"adds one class image per instance image), {c0['warmup']} warm-up steps then {c0['steps']} timed "
                f"steps of `Trainer.train()` per run, each run in a fresh process{_passes_text(s)}. "
                f"A baseline per method (no cache, no gradient checkpointing, torch AdamW) and one-factor variations. "
                f"`steps/s` is timed steps over their total time; `× baseline` compares median step times (steadier "
                f"on a shared machine). Peak RSS is dominated by the imported libraries (~0.9 GiB): the tiny "
                f"model itself is a few MiB.",
                "", _table(*tiny_table(tiny, cuda)), "", *_passes_details(tiny)]
    return out


def _model_sections(report: Report, cuda: bool) -> list[str]:
    """Part B: LoRA on an SD 1.5 / SDXL-architecture model with random weights."""
    s = report.settings
    out: list[str] = []
    for model in ("sd15", "sdxl"):
        rows = [c for c in report.cases if c["part"] == model]
        if not rows:
            continue
        info = report.models.get(model, {})
        params = info.get("params", {})
        name = "SD 1.5" if model == "sd15" else "SDXL"
        sizes = ", ".join(f"{k} {v / 1e6:.0f} M" for k, v in params.items())
        c0 = rows[0]
        out += [f"## B. LoRA on an {name}-architecture model (random weights)", "",
                f"A stock diffusers `{'StableDiffusionPipeline' if model == 'sd15' else 'StableDiffusionXLPipeline'}` "
                f"with {name}'s exact configs ({sizes} parameters; CLIP BPE tokenizer built offline) and random "
                f"weights, saved with `save_pretrained` to a folder and loaded by the trainer as `model.base` "
                f"(building and saving it took {info.get('build_s', 0):.0f} s, not counted below). "
                f"LoRA rank 16 on the U-Net attention, batch 1, {c0['resolution']} px, {c0['warmup']} warm-up "
                f"step(s) then {c0['steps']} timed step(s) per run, each run in a fresh process{_passes_text(s)}. "
                f"`data.cache=true` encodes the images with the VAE and the prompts with the text encoder once, "
                f"before training, so a step skips both. The text encoder's cost per step does not depend on the "
                f"resolution while the U-Net's (and the VAE's) grows with the pixel count, so expect a smaller "
                f"speed-up at 512 px than at a small resolution (`--resolution 512` measures it).",
                "", _table(*sd_table(rows, cuda)), "", *_passes_details(rows)]
    return out


def _overhead_section(report: Report) -> list[str]:
    """Part C: the trainer's overhead over a bare PyTorch loop."""
    out: list[str] = []
    if report.overhead:
        o = report.overhead
        out += ["## C. Trainer overhead over a bare PyTorch loop", "",
                f"`{o['model']}`, LoRA, {o['resolution']} px, batch {o['images_per_step']}, no cache, in one process "
                f"on the same modules and the same collated batch. The bare loop "
                f"(`personalize.perf.BareLoop`) does what a stand-alone diffusers script does: VAE encode + sample, "
                f"tokenize + text encode, noise and timesteps, U-Net forward, MSE, backward, gradient clipping, "
                f"torch AdamW step, `loss.item()`; a second instance of it, timed like the others, shows how much two "
                f"identical loops differ here (the noise floor). The trainer row runs the body of `Trainer.train()`'s loop "
                f"(`_optimizer_step` + logging; progress bar off). {o['warmup']} warm-up steps each, then "
                f"{o['rounds']} rounds of one {o['window']}-step window per loop, the order rotating every round; "
                f"ms/step is the median window, the overhead the median of the per-round ratios trainer/bare "
                f"(ratio of the medians: {o['overhead_of_medians_pct']:+.1f} %).", "",
                _table(*overhead_table(o)), ""]
        if o.get("extras_us"):
            total = sum(o["extras_us"].values())
            rows = [[name, f"{us:.0f}"] for name, us in o["extras_us"].items()]
            rows.append(["**total**", f"**{total:.0f}**"])
            out += [f"What the trainer does per step that the bare loop does not, each piece timed alone (best of "
                    f"3 × 200 calls, net of the bare loop's counterpart where it has one): {total / 1000:.2f} ms, "
                    f"{100 * total / 1000 / o['median_ms']['bare']:.1f} % of a bare step here.", "",
                    _table(["trainer-only work per step", "µs"], rows), ""]
        out += ["<details><summary>ms per round</summary>", ""]
        out += [f"- {k}: " + ", ".join(f"{t:.1f}" for t in v) for k, v in o["round_ms"].items()]
        out += ["", "</details>", ""]
    return out


def _notes_section(cuda: bool) -> list[str]:
    """How the figures were measured."""
    out: list[str] = []
    out += ["## Notes", "",
            "- **Timing**: wall time between the ends of consecutive optimizer steps after the warm-up steps "
            "(CUDA is synchronized first); setup, class-image generation, latent caching and the final export are "
            "not timed.",
            "- **Memory**: `peak RSS` is the process's `ru_maxrss` (everything since it started: imports, model "
            "loading, caching, training). `step peak over resting RSS` is the highest resident set size during the "
            "timed steps (the kernel's `VmHWM`, reset through `/proc/self/clear_refs` after the warm-up) minus the "
            "resident set size right after the warm-up (models paged in, optimizer state allocated): what one "
            "training step needs on top (activations, gradients, temporaries)"
            + (". On CUDA, `GPU peak` is `torch.cuda.max_memory_allocated()` over the timed steps (reset after "
               "the warm-up) and `GPU resting` what stays allocated between steps (models, optimizer state)."
               if cuda else "."),
            "- **Cache**: `data.cache=true` caches VAE latents (posterior mean and std; the latent is still sampled "
            "per step) for every method, and text embeddings only where the text encoder is frozen (LoRA, "
            "DreamBooth here); Textual Inversion and this text2image recipe train the text encoder, so only the "
            "VAE is skipped.",
            "- The machine may be shared: the load average above shows how busy it was. On a busy machine the "
            "absolute numbers drop; a process with as many torch threads as cores then loses much more (its "
            "OpenMP threads wait on each other) than one with fewer, hence `--threads 1` there. Part C's "
            "interleaving keeps its comparison fair either way.",
            "- GPU runs: `python eval/bench_train.py --device cuda` (SD 1.5 at 512 px and SDXL at 1024 px, with "
            "8-bit AdamW + gradient checkpointing, bf16 autocast); `--quick`, `--only tiny|sd15|sdxl|overhead`, "
            "`--resolution`, `--steps`; `--help` for all options.", ""]
    return out


def _failures_section(report: Report) -> list[str]:
    """Cases that failed, if any."""
    out: list[str] = []
    if report.failures:
        out += ["## Failures", ""] + [f"- {f.splitlines()[0]} `{f.splitlines()[-1]}`" for f in report.failures] + [""]
    return out

def print_summary(report: Report, log: Callable[[str], None] = print) -> None:
    log(render_markdown(report))


def replace_section(doc: Path, begin: str, end: str, section: str) -> None:
    """Put ``section`` (which starts with ``begin`` and ends with ``end``) into ``doc`` in place of the
    previous one, or at its end."""
    text = doc.read_text() if doc.is_file() else ""
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda m: section, text, flags=re.S) \
        if begin in text else text.rstrip() + "\n\n" + section + "\n"
    doc.write_text(text)
