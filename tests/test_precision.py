"""train.mixed_precision: auto picks what the hardware does natively; explicit bf16 on a CPU without bf16
instructions is kept but warned about (PyTorch emulates it there, many times slower than float32)."""

import json
import logging

import pytest

from conftest import make_config
from personalize.utils import precision
from personalize.utils.precision import cpu_flags, resolve_mixed_precision
from personalize.training.trainer import Trainer

X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
X86_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_cpu_flags_read_x86_and_arm_cpuinfo():
    assert "avx2" in cpu_flags(X86_AVX2) and not cpu_flags(X86_AVX2) & precision.BF16_CPU_FLAGS
    assert {"avx512_bf16", "amx_bf16"} <= cpu_flags(X86_BF16)
    assert "bf16" in cpu_flags(ARM_BF16)


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "no")])
def test_auto_on_cpu_follows_bf16_instructions(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert resolve_mixed_precision("auto", "cpu") == expected


def test_auto_on_gpus_and_other_devices(monkeypatch):
    monkeypatch.setattr(precision.torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_mixed_precision("auto", "cuda") == "fp16"
    monkeypatch.setattr(precision.torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_mixed_precision("auto", "cuda") == "bf16"
    assert resolve_mixed_precision("auto", "mps") == "no"


def test_explicit_bf16_on_a_cpu_without_bf16_is_kept_and_warned(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="personalize"):
        assert resolve_mixed_precision("bf16", "cpu") == "bf16"
    assert "without bfloat16 instructions" in caplog.text and "'auto'" in caplog.text
    caplog.clear()
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    with caplog.at_level(logging.WARNING, logger="personalize"):
        assert resolve_mixed_precision("bf16", "cpu") == "bf16"
        assert resolve_mixed_precision("no", "cpu") == "no"
    assert not caplog.text


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "no")])
def test_trainer_runs_auto_at_the_resolved_precision(monkeypatch, tmp_path, native, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    config = make_config("tiny/textual-inversion", tmp_path, "train.mixed_precision=auto", "train.max_steps=2",
                         "train.checkpoint_every=0", "validation.prompts=[]")
    trainer = Trainer(config)
    trainer.setup()
    assert trainer.mixed_precision == expected
    assert trainer.accelerator.mixed_precision == expected
    trainer.train()
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["mixed_precision"] == expected
