"""Shared fixtures: tiny in-process training runs on the built-in random models (nothing downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.chdir(ROOT)  # recipes name data relative to the repository root
os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUIET = ["train.progress_bar=false", "train.report_to=none"]


def load_script(relative: str):
    """Import a script of the repository (``eval/...``, ``data_tools/...``) as a module, by its path."""
    import importlib.util

    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_config(recipe: str, tmp_path: Path, *overrides: str):
    from personalize.recipes import resolve_recipe
    from personalize.recipes import load_config

    return load_config(resolve_recipe(recipe), [f"train.output_dir={tmp_path / 'run'}", *QUIET, *overrides])


def run_training(recipe: str, tmp_path: Path, *overrides: str):
    """Train ``recipe`` (a shipped name like 'tiny/lora') to the end; return the finished Trainer."""
    from personalize.training.trainer import Trainer

    trainer = Trainer(make_config(recipe, tmp_path, *overrides))
    trainer.train()
    return trainer


@pytest.fixture
def train_run():
    return run_training


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp_path (the hub library reads its paths at import time)."""
    import huggingface_hub.constants as hf_constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))
    return home
