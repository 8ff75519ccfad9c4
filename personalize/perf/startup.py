"""How fast the command line answers where nothing needs a model: whole-process wall time and peak
resident memory of ``python -m personalize ...`` over repeated runs (``eval/cli_startup.py``)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

# what a user types before any model loads; each must answer at once (issue 23: <= 1 s, <= 150 MB)
COMMANDS = (
    ["--help"], ["train", "--help"], ["generate", "--help"], ["eval", "--help"], ["zero-shot", "--help"],
    ["demo", "--help"], ["recipes", "--help"], ["recipes"],
    ["train", "tiny/lora", "lora.rnak=4"],  # a misspelled key
    ["train", "tiny/lora", "lora.rank=0"],  # an impossible value
)


def run_once(args: Sequence[str], cwd: Path, env: dict) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit code) of one ``python -m personalize ARGS`` process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "personalize", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024, proc.returncode


def measure(commands: Sequence[Sequence[str]] = COMMANDS, runs: int = 5, cwd: Path | None = None) -> list[dict]:
    """Per command: median and max wall seconds and peak RSS over ``runs`` runs after one warm-up."""
    cwd = cwd or Path(__file__).resolve().parents[2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rows = []
    for args in commands:
        run_once(args, cwd, env)  # warm-up: the file system cache
        samples = [run_once(args, cwd, env) for _ in range(runs)]
        walls, peaks = [s[0] for s in samples], [s[1] for s in samples]
        rows.append({"command": " ".join(["personalize", *args]), "exit": samples[-1][2],
                     "wall_median_s": statistics.median(walls), "wall_max_s": max(walls),
                     "peak_mib_median": statistics.median(peaks), "peak_mib_max": max(peaks)})
    return rows


def markdown(rows: list[dict], runs: int, command: str) -> list[str]:
    lines = ["## Command-line start-up", "",
             f"Measured by `{command}`: each command {runs} times after a warm-up run, as a whole process "
             "(`python -m personalize ...`, output discarded); wall time and the process's peak resident memory "
             "(`ru_maxrss`). Nothing here loads a model: the parser and the recipe schema (every method's "
             "options, `personalize/methods/options.py`) import neither torch nor diffusers.", "",
             "| command | exit | wall s (median / max) | peak MiB (median / max) |", "|---|---:|---:|---:|"]
    lines += [f"| `{r['command']}` | {r['exit']} | {r['wall_median_s']:.2f} / {r['wall_max_s']:.2f} | "
              f"{r['peak_mib_median']:.0f} / {r['peak_mib_max']:.0f} |" for r in rows]
    return lines + [""]
