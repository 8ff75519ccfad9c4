"""The in-context model on tiny random U-Nets: exactness at initialization, what trains, the reference
encoder runs once per generation, save / load of the added weights."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from personalize.incontext import (
    InContextLoadError, InContextSpec, ReferenceAttnProcessor, encode_references, install_reference_attention,
    load_incontext, predict_noise, reference_parameters, save_incontext,
)
from personalize.models.family import FAMILIES
from personalize.models.tiny import build_tiny

from conftest import load_script, make_config


def tiny(name="tiny-sd"):
    family, comps = build_tiny(name)
    return FAMILIES[family], comps


def conditioning(family, comps, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = comps["unet"].config.cross_attention_dim
    text = {"prompt_embeds": torch.randn(n, 8, width, generator=g)}
    if family.name == "sdxl":
        text["pooled_prompt_embeds"] = torch.randn(n, 32, generator=g)
    return family.unet_conditioning(text, {}, 64)


def inputs(comps, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g)


@pytest.mark.parametrize("query", ["shared", "self"])
@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_installed_model_predicts_exactly_the_base_noise(name, query):
    family, comps = tiny(name)
    unet = comps["unet"].eval()
    base = copy.deepcopy(unet)
    names = install_reference_attention(unet, ["down", "mid", "up"], query)
    assert names and all(isinstance(unet.attn_processors[n], ReferenceAttnProcessor) for n in names)
    k, b = 3, 2
    refs = encode_references(unet, torch.randn(b * k, 4, 8, 8), conditioning(family, comps, b * k, 5), k)
    noisy, t = inputs(comps, b)
    cond = conditioning(family, comps, b)
    with torch.no_grad():
        expected = base(noisy, t, **cond).sample
        got = predict_noise(unet, noisy, t, cond, refs)
        plain = predict_noise(unet, noisy, t, cond, None)
    assert (got - expected).abs().max() < 1e-6 and torch.equal(plain, expected)
    assert refs.tokens[16].shape == (b, k * 16, 64)  # 4x4 latent level: K * h * w tokens of 64 channels


@pytest.mark.parametrize("query", ["shared", "self"])
def test_trained_reference_layers_change_the_prediction_and_only_they_get_gradients(query):
    family, comps = tiny()
    unet = comps["unet"]
    unet.requires_grad_(False)
    install_reference_attention(unet, ["up"], query)
    params = reference_parameters(unet)
    if query == "self":  # its own query and feature norm, the projections starting from the self-attention
        name, processor = next((n, p) for n, p in unet.attn_processors.items() if isinstance(p, ReferenceAttnProcessor))
        names = {n.rsplit(".", 2)[-2] for n, _ in unet.named_parameters() if ".processor." in n}
        assert names == {"to_q_ref", "norm_ref", "to_k_ref", "to_v_ref", "to_out_ref"}
        attn1 = unet.get_submodule(name.removesuffix("attn2.processor") + "attn1")
        assert torch.equal(processor.to_k_ref.weight, attn1.to_k.weight)
        assert torch.equal(processor.to_q_ref.weight, attn1.to_q.weight)
    for p in params:
        p.requires_grad_(True)
    k, b = 2, 2
    refs = encode_references(unet, torch.randn(b * k, 4, 8, 8), conditioning(family, comps, b * k), k)
    noisy, t = inputs(comps, b)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)
    loss = predict_noise(unet, noisy, t, conditioning(family, comps, b), refs).pow(2).mean()
    loss.backward()
    trained = {id(p) for p in params}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in unet.parameters() if id(p) not in trained)


def test_masked_samples_skip_the_reference_branch_and_the_others_are_unchanged():
    """A per-sample mask of 0 (reference dropout, the unconditional guidance terms) gives that sample the
    base prediction; the other samples predict what they predict alone (the branch runs on them only)."""
    from personalize.incontext import ReferenceFeatures

    family, comps = tiny()
    unet = comps["unet"].eval()
    base = copy.deepcopy(unet)
    install_reference_attention(unet, ["mid", "up"])
    with torch.no_grad():
        for p in reference_parameters(unet):
            p.add_(torch.randn_like(p) * 0.1)
    k, b = 2, 3
    refs = encode_references(unet, torch.randn(b * k, 4, 8, 8), conditioning(family, comps, b * k), k)
    noisy, t = inputs(comps, b)
    cond = conditioning(family, comps, b)
    masked = ReferenceFeatures(refs.tokens, torch.tensor([1.0, 0.0, 1.0]))
    with torch.no_grad():
        got = predict_noise(unet, noisy, t, cond, masked)
        assert (got[1] - base(noisy, t, **cond).sample[1]).abs().max() < 1e-6
        for i in (0, 2):
            alone = ReferenceFeatures({n: v[i:i + 1] for n, v in refs.tokens.items()})
            one = {key: v[i:i + 1] for key, v in cond.items()}
            assert (got[i] - predict_noise(unet, noisy[i:i + 1], t[i:i + 1], one, alone)[0]).abs().max() < 1e-5
        none = predict_noise(unet, noisy, t, cond, ReferenceFeatures(refs.tokens, torch.zeros(b)))
    assert (none - base(noisy, t, **cond).sample).abs().max() < 1e-6


@pytest.mark.parametrize("query", ["shared", "self"])
def test_save_load_round_trip_and_wrong_family_is_a_clear_error(tmp_path, query):
    family, comps = tiny()
    unet = comps["unet"]
    install_reference_attention(unet, ["up"], query)
    with torch.no_grad():
        for p in reference_parameters(unet):
            p.normal_()
    save_incontext(unet, InContextSpec(family="sd", blocks=["up"], num_references=3, reference_query=query),
                   tmp_path / "ic")
    _, fresh = tiny()
    spec = load_incontext(fresh["unet"], tmp_path / "ic", "sd")
    assert spec.num_references == 3 and spec.reference_query == query
    for (n1, p1), (n2, p2) in zip(unet.named_parameters(), fresh["unet"].named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    _, xl = tiny("tiny-sdxl")
    with pytest.raises(InContextLoadError, match="trained on an sd model; the base model is sdxl"):
        load_incontext(xl["unet"], tmp_path / "ic", "sdxl")
    with pytest.raises(InContextLoadError, match="another U-Net"):
        load_incontext(xl["unet"], tmp_path / "ic", "sd")
    with pytest.raises(InContextLoadError, match="no incontext_config.json"):
        load_incontext(fresh["unet"], tmp_path, "sd")


# -- training with the shared trainer, and generation --------------------------------------------

def _changed(trainer, fresh_unet) -> set[str]:
    unet = trainer.models.unet
    fresh = dict(fresh_unet.named_parameters())
    changed = set()
    for name, p in unet.named_parameters():
        base = fresh.get(name.replace(".base_layer", ""))  # peft keeps the wrapped weight as base_layer
        if base is None or not torch.equal(p.detach().float(), base.detach().float()):
            changed.add(name)
    return changed


@pytest.mark.parametrize("lora_rank,targets", [(0, None), (4, None), (4, "[to_q,to_v,ff.net.2,conv1,conv2]")])
def test_incontext_trains_only_the_reference_layers_or_with_lora(train_run, tmp_path, lora_rank, targets):
    """Base frozen: only the reference layers change; with LoRA (on attention, or also on feed-forward
    and ResNet convolutions) only those and the LoRA weights; generation merges LoRA exactly."""
    trainer = train_run("tiny/incontext", tmp_path, "train.max_steps=2", f"incontext.lora_rank={lora_rank}",
                        "train.mixed_precision=no", *([f"incontext.lora_target_modules={targets}"] if targets else []))
    changed = _changed(trainer, tiny()[1]["unet"])
    ref = {n for n in changed if "_ref." in n}
    assert ref and all(".processor." in n for n in ref)
    others = changed - ref
    if lora_rank:
        assert others and all("lora_" in n for n in others)
        if targets:
            assert any(".conv1.lora_" in n for n in others) and any(".ff.net.2.lora_" in n for n in others)
    else:
        assert not others
    unfused = tiny()[1]["unet"]
    spec = load_incontext(unfused, tmp_path / "run", "sd")
    assert spec.num_references == 2 and spec.base == "tiny-sd" and (spec.lora is not None) == bool(lora_rank)
    from personalize.incontext.pipeline import InContextPipeline

    fused = InContextPipeline.from_pretrained(tmp_path / "run", base="tiny-sd").models.unet  # LoRA merged
    torch.manual_seed(0)
    latents, refs, t = torch.randn(2, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.tensor([10, 500])
    text = torch.randn(4, 77, unfused.config.cross_attention_dim)
    with torch.no_grad():
        outs = [predict_noise(unet, latents, t, {"encoder_hidden_states": text[:2]},
                              encode_references(unet, refs, {"encoder_hidden_states": text}, 2))
                for unet in (unfused, fused)]
    assert (outs[0] - outs[1]).abs().max() < 1e-5
    assert any(getattr(m, "merged", False) for m in fused.modules()) == bool(lora_rank)


def test_init_from_starts_from_a_trained_model_and_refuses_a_mismatch(train_run, tmp_path):
    """incontext.init_from loads a trained model's layers before training (toy/incontext-continue); a model
    with blocks the recipe lacks, a lower K or another LoRA rank is a clear error naming the key; a higher K
    (more examples per target) is allowed."""
    from safetensors.torch import load_file

    from personalize.incontext import reference_state_dict
    from personalize.training.trainer import Trainer

    train_run("tiny/incontext", tmp_path / "a", "train.max_steps=2", "train.mixed_precision=no")
    first = load_file(str(tmp_path / "a" / "run" / "incontext_weights.safetensors"))
    assert any("to_out_ref" in k and v.abs().sum() > 0 for k, v in first.items())  # trained away from zero
    trainer = Trainer(make_config("tiny/incontext", tmp_path / "b", "train.max_steps=1", "train.mixed_precision=no",
                                  f"incontext.init_from={tmp_path / 'a' / 'run'}"))
    trainer.setup()
    loaded = reference_state_dict(trainer.models.unet)
    assert set(loaded) == set(first) and all(torch.equal(loaded[k], first[k]) for k in first)
    more = Trainer(make_config("tiny/incontext", tmp_path / "k3", "train.max_steps=1", "train.mixed_precision=no",
                               "incontext.num_references=3", f"incontext.init_from={tmp_path / 'a' / 'run'}"))
    more.setup()
    assert all(torch.equal(reference_state_dict(more.models.unet)[k], first[k]) for k in first)
    for override, key in (("incontext.blocks=[mid]", "blocks"), ("incontext.num_references=1", "num_references"),
                          ("incontext.reference_query=self", "reference_query")):
        with pytest.raises(InContextLoadError, match=rf"incontext.init_from: .*'{key}'"):
            Trainer(make_config("tiny/incontext", tmp_path / "c", override, "train.mixed_precision=no",
                                f"incontext.init_from={tmp_path / 'a' / 'run'}")).setup()


def test_init_from_can_grow_the_model_without_changing_its_predictions(train_run, tmp_path):
    """A recipe may add block groups and LoRA to the model it starts from: the saved layers load into
    their places, the added ones start at zero, so the grown model predicts what the saved one does."""
    from personalize.incontext import reference_state_dict
    from personalize.incontext.pipeline import InContextPipeline
    from personalize.training.trainer import Trainer

    train_run("tiny/incontext", tmp_path / "a", "train.max_steps=2", "train.mixed_precision=no")
    saved = InContextPipeline.from_pretrained(tmp_path / "a" / "run", base="tiny-sd")
    grown = Trainer(make_config("tiny/incontext", tmp_path / "b", "train.max_steps=1", "train.mixed_precision=no",
                                "incontext.blocks=[mid,up]", "incontext.lora_rank=4",
                                f"incontext.init_from={tmp_path / 'a' / 'run'}"))
    grown.setup()
    unet = grown.models.unet
    assert any(k.startswith("mid_block.") for k in reference_state_dict(unet))
    assert any("lora_A" in n for n, _ in unet.named_parameters())
    saved_unet = saved.models.unet
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8)
    refs = torch.randn(4, 4, 8, 8)
    text = torch.randn(4, 77, saved_unet.config.cross_attention_dim)
    t = torch.tensor([10, 500])
    outs = []
    with torch.no_grad():
        for model in (saved_unet, unet):
            model.eval()
            features = encode_references(model, refs, {"encoder_hidden_states": text}, 2)
            outs.append(predict_noise(model, latents, t, {"encoder_hidden_states": text[:2]}, features))
    assert (outs[0] - outs[1]).abs().max() < 1e-5


def test_init_from_can_add_lora_target_modules_but_not_remove_them(train_run, tmp_path):
    """LoRA of the same rank may spread to more U-Net modules (feed-forward, ResNet convolutions): the
    saved LoRA loads into its modules, the added ones start with B = 0, so predictions do not change;
    fewer modules than the saved LoRA has is refused, naming the key."""
    from personalize.training.trainer import Trainer

    attention = "incontext.lora_target_modules=[to_q,to_k,to_v,to_out.0]"
    more = "incontext.lora_target_modules=[to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2,conv1,conv2]"
    train_run("tiny/incontext", tmp_path / "a", "train.max_steps=2", "train.mixed_precision=no",
              "incontext.lora_rank=4", attention)
    saved_unet = tiny()[1]["unet"]
    load_incontext(saved_unet, tmp_path / "a" / "run", "sd")
    grown = Trainer(make_config("tiny/incontext", tmp_path / "b", "train.max_steps=1", "train.mixed_precision=no",
                                "incontext.lora_rank=4", more, f"incontext.init_from={tmp_path / 'a' / 'run'}"))
    grown.setup()
    unet = grown.models.unet
    params = dict(unet.named_parameters())
    saved_params = dict(saved_unet.named_parameters())
    conv_b = [n for n in params if ".conv1.lora_B" in n]
    assert conv_b and all(params[n].abs().sum() == 0 for n in conv_b)  # added LoRA starts at zero
    attn_b = [n for n in saved_params if "to_q.lora_B" in n]
    assert attn_b and all(torch.equal(params[n], saved_params[n]) for n in attn_b)  # saved LoRA loaded
    assert any(saved_params[n].abs().sum() > 0 for n in attn_b)  # ... and it was trained away from zero
    assert all(p.requires_grad for n, p in params.items() if "lora_" in n)
    torch.manual_seed(0)
    latents, refs, t = torch.randn(2, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.tensor([10, 500])
    text = torch.randn(4, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        outs = [predict_noise(m.eval(), latents, t, {"encoder_hidden_states": text[:2]},
                              encode_references(m, refs, {"encoder_hidden_states": text}, 2))
                for m in (saved_unet, unet)]
    assert (outs[0] - outs[1]).abs().max() < 1e-5
    train_run("tiny/incontext", tmp_path / "c", "train.max_steps=1", "train.mixed_precision=no",
              "incontext.lora_rank=4", more)
    with pytest.raises(InContextLoadError, match=r"incontext.init_from: .*'lora_target_modules'"):
        Trainer(make_config("tiny/incontext", tmp_path / "d", "train.max_steps=1", "train.mixed_precision=no",
                            "incontext.lora_rank=4", attention, f"incontext.init_from={tmp_path / 'c' / 'run'}")).setup()


def test_probe_measures_reference_gain_and_attention_entropy(train_run, tmp_path):
    """eval/incontext_probe.py's measures: a gain per model and a normalized entropy per reference layer,
    1 exactly when the attention is uniform (all keys equal); the probe leaves the processors as it found them."""
    from personalize.incontext.pipeline import InContextPipeline
    from personalize.evaluation.incontext_probe import probe

    train_run("tiny/incontext", tmp_path, "train.max_steps=1", "train.mixed_precision=no")
    pipe = InContextPipeline.from_pretrained(tmp_path / "run", base="tiny-sd")
    result = probe(pipe, n_subjects=2, timesteps=(300, 700))
    layers = {n.removesuffix(".processor") for n, p in pipe.models.unet.attn_processors.items()
              if isinstance(p, ReferenceAttnProcessor)}
    assert set(result["entropy"]) == layers and all(0 < e <= 1 + 1e-6 for e in result["entropy"].values())
    assert -1 < result["reference_gain"] < 1
    assert not any("attend" in vars(p) for p in pipe.models.unet.attn_processors.values())
    with torch.no_grad():
        for name, p in pipe.models.unet.named_parameters():
            if "to_k_ref" in name:
                p.zero_()  # every key 0: uniform attention
    uniform = probe(pipe, n_subjects=1, timesteps=(500,))
    assert all(abs(e - 1) < 1e-5 for e in uniform["entropy"].values())


def test_pipeline_encodes_references_once_and_checks_them(train_run, tmp_path):
    from PIL import Image

    from personalize.incontext.pipeline import InContextPipeline, ReferenceImageError

    train_run("tiny/incontext", tmp_path, "train.max_steps=1", "train.mixed_precision=no")
    pipe = InContextPipeline.from_pretrained(tmp_path / "run", base="tiny-sd")
    calls = []
    original = pipe.models.unet.forward
    pipe.models.unet.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    refs = ["recipes/tiny/subject/00.png", "recipes/tiny/subject/01.png"]
    images = pipe("a red and blue toy in the snow", refs, ["a toy on grass", "a toy in the snow"], num_images=2,
                  steps=3)
    assert len(images) == 2 and images[0].size == (64, 64)
    assert pipe.reference_encodings == 1 and len(calls) == 3  # one U-Net call per step, references encoded once
    again = pipe("a red and blue toy in the snow", refs, ["a toy on grass", "a toy in the snow"], num_images=2, steps=3)
    assert all((a.tobytes() == b.tobytes()) for a, b in zip(images, again))  # seeded
    import numpy as np

    half = pipe("a red and blue toy in the snow", refs, ["a toy on grass", "a toy in the snow"], num_images=2, steps=3,
                bf16=True)  # bfloat16 autocast: the same images up to rounding
    diff = [np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() for a, b in zip(images, half)]
    assert max(diff) < 8 and pipe.reference_encodings == 3
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ReferenceImageError, match="bad.png"):
        pipe("x", [refs[0], str(bad)])
    with pytest.raises(ReferenceImageError, match="no reference images"):
        pipe("x", [])
    with pytest.raises(ReferenceImageError, match="trained with at most 2"):
        pipe("x", refs + refs[:1])
    assert len(pipe("x", refs + refs[:1], allow_more_references=True, steps=2)) == 1
    with pytest.raises(ReferenceImageError, match="2 reference images but 1 reference captions"):
        pipe("x", refs, ["one caption"])
    assert len(pipe("x", [Image.open(refs[0])], steps=2)) == 1  # PIL images work too


def test_copy_paste_rate_flags_near_duplicates_of_references():
    import numpy as np

    from personalize.metrics import copy_paste_rate

    rng = np.random.default_rng(0)
    refs = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    noisy_copy = np.clip(refs[1].astype(int) + rng.integers(-3, 4, (64, 64, 3)), 0, 255).astype(np.uint8)
    others = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    assert copy_paste_rate([noisy_copy, refs[2][:, ::-1], *others[:2]], refs) == 0.5  # a copy and a mirrored copy
    assert copy_paste_rate(others, refs) == 0.0


def test_incontext_row_in_the_harness(train_run, tmp_path, monkeypatch):
    import json

    from personalize.evaluation.subjects import BenchSubject, EvalPrompt, LaunchState
    from personalize.evaluation.harness import run_benchmark
    from personalize.evaluation.settings import EvalSettings
    from personalize.incontext.pipeline import InContextPipeline
    from personalize.metrics import load_metrics
    from personalize.evaluation.rows import build_row

    encoded = []  # how many references each encoding saw
    original = InContextPipeline.encode_references
    monkeypatch.setattr(InContextPipeline, "encode_references",
                        lambda self, images, captions: encoded.append(len(images)) or original(self, images, captions))
    train_run("tiny/incontext", tmp_path, "train.max_steps=1", "train.mixed_precision=no")  # 2 references
    refs = sorted(Path("recipes/tiny/subject").glob("*.png"))[:3]
    subject = BenchSubject("toy", "toy", refs, [EvalPrompt(0, "a {} in the snow", "recontextualization")])
    row = build_row(f"incontext:{tmp_path / 'run'}")
    settings = EvalSettings(out=str(tmp_path / "eval"), images_per_prompt=2, steps=2, guidance=3.0)
    files = run_benchmark([subject], [row], load_metrics("tiny"), settings, state=LaunchState(), log=lambda m: None)
    result = json.loads(files["json"].read_text())
    entry = result["table"]["incontext"]
    assert entry["subjects"] == 1 and 0.0 <= entry["copy_paste_rate"] <= 1.0 and entry["train_seconds"] is None
    assert result["rows"][0]["model"] == str(tmp_path / "run")
    assert encoded == [2]  # as many references as the model was trained with
    assert "references per subject: as many as the model was trained with" in files["markdown"].read_text()
    # no ref_guidance given: the model's own scale (this run names none: the pipeline's default), in the report
    assert result["rows"][0]["ref_scale"] == 2.0
    assert "reference guidance each model's own (incontext: 2.0)" in files["markdown"].read_text()

    # all three of the subject's references, more than the model was trained with, when asked
    settings = EvalSettings(out=str(tmp_path / "eval3"), images_per_prompt=2, steps=2, guidance=3.0, references=3,
                            ref_guidance=2.0)
    files = run_benchmark([subject], [row], load_metrics("tiny"), settings, state=LaunchState(), log=lambda m: None)
    assert encoded == [2, 3]
    assert "references per subject: 3" in files["markdown"].read_text()
    assert "reference guidance 2.0," in files["markdown"].read_text()
    with pytest.raises(ValueError, match="incontext:FOLDER"):
        build_row("incontext")


def test_zero_shot_command_writes_images_and_reports_bad_references(train_run, tmp_path, capsys):
    from personalize.cli import main

    train_run("tiny/incontext", tmp_path, "train.max_steps=1", "train.mixed_precision=no")
    refs = ["recipes/tiny/subject/00.png", "recipes/tiny/subject/01.png"]
    out = tmp_path / "zs"
    args = ["zero-shot", "--model", str(tmp_path / "run"), "--refs", *refs, "--prompt", "a toy in the snow",
            "-n", "2", "--steps", "2", "--out", str(out)]
    assert main(args) == 0 and (out / "grid.png").is_file() and len(list(out.glob("0*.png"))) == 2
    assert main([*args[:4], "missing.png", "--prompt", "x", "--out", str(out)]) == 2
    assert "missing.png" in capsys.readouterr().err


@pytest.mark.parametrize("folder, query, k, scale", [("toy-incontext", "shared", 3, 4.0),
                                                     ("toy-incontext-self", "self", 4, 6.0)])
def test_shipped_toy_incontext_models_load_and_sample(folder, query, k, scale):
    """The in-context models shipped in the package load onto the shipped toy model and generate from
    rendered references (personalize zero-shot's default, the own-query model, and the shared-query one
    beside it), each at the reference scale it was shipped with unless told otherwise."""
    from personalize.incontext.pipeline import InContextPipeline
    from personalize.models.toy import ASSETS
    from personalize.toyworld.world import heldout_subjects, render, sample_spec
    from PIL import Image
    import numpy as np

    pipe = InContextPipeline.from_pretrained(ASSETS / folder, base="toy")
    assert pipe.spec.reference_query == query and pipe.spec.num_references == k
    rng = np.random.default_rng(0)
    subject = heldout_subjects()[0]
    refs = [Image.fromarray(render(sample_spec(rng, subject))) for _ in range(k)]
    images = pipe(f"a {subject.cls} in the snow", refs, [f"a {subject.cls}"] * k, steps=2)
    assert len(images) == 1 and images[0].size == (64, 64)
    assert pipe.spec.default_ref_scale == scale
    same = pipe(f"a {subject.cls} in the snow", refs, [f"a {subject.cls}"] * k, steps=2, ref_scale=scale)
    other = pipe(f"a {subject.cls} in the snow", refs, [f"a {subject.cls}"] * k, steps=2, ref_scale=1.0)
    assert np.array_equal(np.asarray(images[0]), np.asarray(same[0]))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(other[0]))


def test_zero_shot_default_model_is_the_own_query_one():
    from personalize.incontext.model import read_spec
    from personalize.incontext.shipped import default_model
    from personalize.models.toy import ASSETS

    assert default_model() == ASSETS / "toy-incontext-self"
    assert read_spec(default_model()).ref_scale == 6.0


def test_unknown_reference_query_is_refused_naming_the_key(tmp_path):
    from personalize.config import ConfigError

    with pytest.raises(ConfigError, match=r"incontext.reference_query: 'sharp'; choose from shared, self"):
        make_config("tiny/incontext", tmp_path, "incontext.reference_query=sharp")


def test_ship_card_names_a_stage_that_raised_k(tmp_path):
    """eval/toy_incontext.py's card says when the last stage trained with more examples per target than
    the model it started from (incontext.init_from may raise K)."""
    import json

    toy_incontext = load_script("eval/toy_incontext.py")
    start = tmp_path / "start"
    start.mkdir()
    (start / "incontext_config.json").write_text(json.dumps({"num_references": 3}))
    summary = {"steps": 800, "train_seconds": 600.0, "final_loss": 0.03, "mixed_precision": "no"}
    options = {"num_references": 4, "blocks": ["up"], "init_from": str(start)}
    text = toy_incontext.card({"incontext": options, "train": {}}, summary, "toy/incontext-self-lora")
    assert "their examples (3 per target in the stages before the last, 4 in the last)" in text
    same = toy_incontext.card({"incontext": {**options, "num_references": 3}, "train": {}}, summary, "toy/x")
    assert "their 3 examples" in same and "stages before the last" not in same


def test_reference_guidance_interval(train_run, tmp_path):
    """ref_interval=(lo, hi): the reference scale applies only at noise levels lo <= t/T <= hi, scale 1
    elsewhere; (0, 1) is plain reference guidance, an interval that holds no sampling step is scale 1."""
    import argparse

    from personalize.utils.arguments import parse_interval
    from personalize.incontext.pipeline import InContextPipeline

    train_run("tiny/incontext", tmp_path, "train.max_steps=1", "train.mixed_precision=no")
    pipe = InContextPipeline.from_pretrained(tmp_path / "run", base="tiny-sd")
    with torch.no_grad():
        for name, p in pipe.models.unet.named_parameters():
            if "to_out_ref" in name:
                p.normal_(0, 0.2)  # a reference branch that matters
    refs = ["recipes/tiny/subject/00.png", "recipes/tiny/subject/01.png"]
    caps = ["a toy on grass", "a toy in the snow"]

    def sample(ref_scale, interval=None):  # 4 DDIM steps: t = 751, 501, 251, 1 of 1000
        return pipe._sample("a toy in the snow", refs, caps, 2, 4.0, ref_scale, 4, 0, False, interval)

    full, unit = sample(3.0), sample(1.0)
    assert not torch.allclose(full, unit, atol=1e-4)
    assert torch.equal(sample(3.0, (0.0, 1.0)), full)
    assert torch.equal(sample(3.0, (0.0, 0.0)), unit)  # no step inside the interval
    late = sample(3.0, (0.0, 0.6))  # the last 3 steps only
    assert not torch.allclose(late, full, atol=1e-4) and not torch.allclose(late, unit, atol=1e-4)
    with pytest.raises(ValueError, match="0 <= lo <= hi <= 1"):
        sample(3.0, (0.6, 0.2))
    assert parse_interval("0,0.6") == (0.0, 0.6)
    for bad in ("0.6,0.2", "x", "0,1,2"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_interval(bad)


def test_ship_refuses_a_run_already_shipped_into_the_folder_it_started_from(tmp_path):
    """Shipping a stage into the folder it was trained from, a second time, would read its own card as the
    earlier stages and list itself twice: eval/toy_incontext.py refuses, saying so."""
    import json

    import yaml

    toy_incontext = load_script("eval/toy_incontext.py")
    target, run = tmp_path / "shipped", tmp_path / "run"
    for folder in (target, run):
        folder.mkdir()
        (folder / "incontext_weights.safetensors").write_bytes(b"same weights")
        (folder / "incontext_config.json").write_text(json.dumps({"num_references": 4}))
    (run / "run_summary.json").write_text(json.dumps({"method": "incontext", "steps": 1}))
    (run / "config.yaml").write_text(yaml.safe_dump({"incontext": {"init_from": str(target)}, "train": {}}))
    with pytest.raises(SystemExit, match="already shipped"):
        toy_incontext.ship(run, "toy/x", target)
    assert (target / "incontext_weights.safetensors").read_bytes() == b"same weights"  # left as it was


def test_ship_reads_a_run_shipped_since_into_its_start_folder_once(tmp_path):
    """A stage trained from a run folder (stage N+1 from outputs/stage-N) whose run was shipped since into
    the folder it had started from: the shipped card already lists stage N, so the record of earlier stages
    lists it once, not twice; while stage N is not shipped there, its run folder adds it."""
    import json

    import yaml

    toy_incontext = load_script("eval/toy_incontext.py")
    shipped, run = tmp_path / "shipped", tmp_path / "stage-2"
    shipped.mkdir(), run.mkdir()
    (shipped / "README.md").write_text("# card\n- Stage 1 (first): 10 steps of batch 2 with 3 examples per target.\n")
    (shipped / "run_summary.json").write_text(json.dumps({"method": "incontext", "steps": 10}))
    (run / "config.yaml").write_text(yaml.safe_dump({"incontext": {"init_from": str(shipped), "num_references": 4},
                                                     "train": {"batch_size": 2}}))
    (run / "run_summary.json").write_text(json.dumps({"method": "incontext", "steps": 20}))
    stages = toy_incontext.earlier_stages({"init_from": str(run)})
    assert len(stages) == 2 and stages[1].startswith("- Stage 2") and "20 steps of batch 2 with 4 examples" in stages[1]
    # stage 2 shipped into `shipped`: its card now ends with stage 2, and run_summary.json is stage 2's
    (shipped / "README.md").write_text("# card\n- Stage 1 (first): 10 steps.\n- Stage 2 (second): 20 steps.\n")
    (shipped / "run_summary.json").write_bytes((run / "run_summary.json").read_bytes())
    assert toy_incontext.earlier_stages({"init_from": str(run)}) == ["- Stage 1 (first): 10 steps.",
                                                                     "- Stage 2 (second): 20 steps."]
    text = toy_incontext.card({"incontext": {"num_references": 4, "init_from": str(run)}, "train": {}},
                              {"steps": 5}, "toy/x", toy_incontext.earlier_stages({"init_from": str(run)}))
    assert "- Stage 3 (`personalize train toy/x`)" in text
    assert "how many per target: on each stage's line below" in text  # stages 1-2 do not name their K


def test_ship_writes_the_chosen_reference_scale_into_the_config_and_card_and_keeps_it(tmp_path):
    """--ref-scale is written into the shipped config (the default at generation time) and named on the card;
    shipping a later run without it keeps the scale the folder had."""
    import json

    import yaml

    from personalize.incontext.model import read_spec

    toy_incontext = load_script("eval/toy_incontext.py")
    target = tmp_path / "shipped"
    for name, weights in (("run-1", b"one"), ("run-2", b"two")):
        run = tmp_path / name
        run.mkdir()
        (run / "incontext_weights.safetensors").write_bytes(weights)
        (run / "incontext_config.json").write_text(json.dumps({"num_references": 4}))
        (run / "run_summary.json").write_text(json.dumps({"method": "incontext", "steps": 1}))
        (run / "config.yaml").write_text(yaml.safe_dump({"incontext": {"num_references": 4}, "train": {}}))
    toy_incontext.ship(tmp_path / "run-1", "toy/x", target, ref_scale=5.5)
    assert read_spec(target).ref_scale == 5.5 and "Reference guidance scale 5.5" in (target / "README.md").read_text()
    toy_incontext.ship(tmp_path / "run-2", "toy/x", target)
    assert (target / "incontext_weights.safetensors").read_bytes() == b"two" and read_spec(target).ref_scale == 5.5
    toy_incontext.ship(tmp_path / "run-1", "toy/x", target, ref_scale=3.0)
    assert read_spec(target).ref_scale == 3.0
