"""Configs refuse typos, wrong types and impossible values with messages that name the key."""

import pytest

from personalize.config import ConfigError
from personalize.recipes import load_config

BASE = {"method": "lora", "data": {"instance_images": "recipes/tiny/subject", "instance_prompt": "a sks toy"}}


def cfg(**sections):
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def test_defaults_and_overrides():
    config = load_config(cfg(), ["train.max_steps=7", "lora.rank=8", "train.learning_rate=1e-4"])
    assert config.train.max_steps == 7
    assert config.method_config.rank == 8
    assert config.train.learning_rate == pytest.approx(1e-4)  # YAML's '1e-4' string is accepted as a number
    assert config.method_config.alpha is None


@pytest.mark.parametrize("override, message", [
    ("train.max_step=3", "unknown key 'train.max_step'; did you mean 'max_steps'?"),
    ("lora.rnak=3", "unknown key 'lora.rnak'; did you mean 'rank'?"),
    ("trian.max_steps=3", "unknown section 'trian'; did you mean 'train'?"),
    ("dreambooth.train_text_encoder=true", "section 'dreambooth' configures method 'dreambooth'"),
])
def test_unknown_keys_name_the_closest(override, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("(", r"\(").replace(")", r"\)")):
        load_config(cfg(), [override])


@pytest.mark.parametrize("override, key", [
    ("lora.rank=0", "lora.rank"),
    ("lora.rank=-2", "lora.rank"),
    ("train.learning_rate=0", "train.learning_rate"),
    ("train.learning_rate=-1e-4", "train.learning_rate"),
    ("data.resolution=500", "data.resolution"),
    ("train.max_steps=abc", "train.max_steps"),
    ("train.max_steps=2.5", "train.max_steps"),
    ("train.gradient_checkpointing=maybe", "train.gradient_checkpointing"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("train.optimizer=lion", "train.optimizer"),
    ("validation.prompts=hello", "validation.prompts"),
    ("lora.dropout=1.5", "lora.dropout"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(cfg(), [override])


def test_method_is_required_and_checked():
    with pytest.raises(ConfigError, match="'method' is required"):
        load_config({"train": {}})
    with pytest.raises(ConfigError, match="did you mean 'lora'"):
        load_config({"method": "loar"})


def test_cross_section_checks():
    with pytest.raises(ConfigError, match="prior.class_images"):
        load_config(cfg(), ["prior.enabled=true"])
    with pytest.raises(ConfigError, match="data.instance_prompt: 'a photo of sks' does not contain the placeholder"):
        load_config({"method": "textual_inversion", "data": {"instance_prompt": "a photo of sks"}},
                    ["textual_inversion.placeholder_token=<x>"])
    with pytest.raises(ConfigError, match="data.cache"):
        load_config(cfg(), ["data.cache=true", "data.random_flip=true"])
    with pytest.raises(ConfigError, match="prior.enabled"):
        load_config({"method": "textual_inversion", "prior": {"enabled": True, "class_images": "x",
                                                              "class_prompt": "y"},
                     "data": {"instance_prompt": "a <sks>"}}, ["textual_inversion.placeholder_token=<sks>"])


def test_recipe_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: lora\ntrain: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    typo = tmp_path / "typo.yaml"
    typo.write_text("method: lora\ndata:\n  instance_image: x\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key 'data.instance_image'; did you mean 'instance_images'"):
        load_config(typo)


def test_config_round_trips_through_dict():
    config = load_config(cfg(), ["lora.rank=8"])
    again = load_config(config.to_dict())
    assert again.to_dict() == config.to_dict()


def test_method_registry_is_checked():
    from dataclasses import dataclass

    from personalize.methods import get_method_class, method_names, register_method
    from personalize.methods.lora import LoRA

    assert method_names() == ["autoencoder", "dreambooth", "incontext", "lora", "text2image", "textual_inversion"]
    assert get_method_class("lora") is LoRA
    with pytest.raises(KeyError, match="did you mean 'lora'"):
        get_method_class("lora2")

    @dataclass
    class Options:
        pass

    clash = type("Clash", (LoRA,), {"name": "lora", "config_cls": Options})
    with pytest.raises(ValueError, match="already registered"):
        register_method(clash)
    with pytest.raises(ValueError, match="must be an identifier"):
        register_method(type("Bad", (LoRA,), {"name": "my-method", "config_cls": Options}))
    with pytest.raises(ValueError, match="config_cls must be a dataclass"):
        register_method(type("NoCfg", (LoRA,), {"name": "nocfg", "config_cls": dict}))


def test_bare_no_from_yaml_or_the_command_line_means_the_string_no():
    from personalize.recipes import load_config

    config = load_config("recipes/tiny/lora.yaml", ["train.mixed_precision=no"])
    assert config.train.mixed_precision == "no"
