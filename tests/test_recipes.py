"""Every shipped recipe parses against the code (a recipe never rots), and the CLI lists them."""

from pathlib import Path

import pytest
import yaml

from personalize.cli import main
from personalize.recipes import RECIPES_DIR, shipped_recipes
from personalize.recipes import load_config

RECIPES = shipped_recipes()
ACCELERATE = sorted((RECIPES_DIR / "accelerate").glob("*.yaml"))


def test_the_expected_recipes_ship():
    names = {str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES}
    assert {"dreambooth-sd15", "dreambooth-lora-sd15", "dreambooth-lora-sdxl", "textual-inversion-sd15",
            "text2image-sd15", "tiny/dreambooth", "tiny/lora", "tiny/textual-inversion", "tiny/text2image"} <= names
    assert {p.stem for p in ACCELERATE} >= {"single-gpu", "multi-gpu", "deepspeed-zero2"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(RECIPES_DIR)))
def test_recipe_parses(recipe: Path):
    config = load_config(recipe)
    assert config.method == yaml.safe_load(recipe.read_text())["method"]
    if "tiny" in recipe.parts:  # tiny recipes use data the repository ships
        data = config.data.metadata or config.data.instance_images or getattr(config.method_config, "manifest", None)
        assert data and Path(data).exists(), data


@pytest.mark.parametrize("recipe", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_are_valid(recipe: Path):
    from accelerate.commands.config.config_args import ClusterConfig

    ClusterConfig.from_yaml_file(str(recipe))


def test_cli_lists_recipes(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "tiny/lora" in out and "dreambooth-sd15" in out
