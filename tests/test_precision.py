"""The precision policy (resolve_precision, autocast, the trainer's and the toy teacher's ``auto``) and
matmul_weights_in: bit-identical results under autocast, originals restored."""

from __future__ import annotations

import json

import pytest
import torch
from distill_mixins.trainer import DistillationTrainer, FunctionData, TrainerConfig
from torch import nn

from distill_mixins.precision import PRECISION_ENV, PrecisionReport, autocast, matmul_weights_in, resolve_precision
from distill_mixins.testing import mixture_batch, ring_mixture
from distill_mixins.toy.train import TeacherTrainConfig
from tests.conftest import SHAPE, make_neural_model

torch.set_num_threads(1)  # tiny tensors (docs/development.md)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Flatten(), nn.Linear(512, 4))


def test_same_results_under_autocast_and_originals_restored():
    model = net().requires_grad_(False)
    x = torch.randn(5, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(x)
        with matmul_weights_in(model):
            assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.float32
            fast = model(x)
    assert torch.equal(reference, fast)
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_restored_on_error():
    model = net()
    pointer = model[0].weight.data_ptr()
    with pytest.raises(RuntimeError, match="boom"), matmul_weights_in(model):
        raise RuntimeError("boom")
    assert model[0].weight.data_ptr() == pointer and model[0].weight.dtype == torch.float32


@pytest.fixture
def cpu(monkeypatch):
    """``cpu(amx, avx512_bf16)``: torch's CPU capability checks answer as given; no precision variable set."""
    monkeypatch.delenv(PRECISION_ENV, raising=False)

    def set_capability(amx: bool, avx512_bf16: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)

    return set_capability


def test_auto_is_float32_without_native_bf16(cpu):
    cpu(False, False)
    assert resolve_precision("auto", "cpu") == "fp32"
    report = PrecisionReport.of("auto", "cpu")
    assert (report.requested, report.resolved, report.native_bf16) == ("auto", "fp32", False)
    assert "without AMX or AVX512-BF16" in report.reason


@pytest.mark.parametrize("amx, avx512_bf16", [(True, False), (False, True), (True, True)])
def test_auto_is_bf16_when_either_capability_check_says_yes(cpu, amx, avx512_bf16):
    cpu(amx, avx512_bf16)
    assert resolve_precision("auto", "cpu") == "bf16"
    assert PrecisionReport.of("auto").reason == "CPU with " + ("AMX" if amx else "AVX512-BF16")


@pytest.mark.parametrize("native", [False, True])
def test_the_environment_variable_overrides_auto_but_not_an_explicit_choice(cpu, monkeypatch, native):
    cpu(native, False)
    for forced in ("fp32", "bf16", " BF16 "):
        monkeypatch.setenv(PRECISION_ENV, forced)
        assert resolve_precision("auto") == forced.strip().lower()
        assert resolve_precision("bf16") == "bf16" and resolve_precision("fp32") == "fp32"
    monkeypatch.setenv(PRECISION_ENV, "auto")
    assert resolve_precision("auto") == ("bf16" if native else "fp32")


def test_a_bad_environment_value_or_precision_names_itself(cpu, monkeypatch):
    with pytest.raises(ValueError, match="precision='float16' is not a precision; choose one of auto, bf16, fp32"):
        resolve_precision("float16")
    with pytest.raises(ValueError, match="precision='bogus'"):
        autocast("bogus")
    monkeypatch.setenv(PRECISION_ENV, "fp16")
    with pytest.raises(ValueError, match=f"environment variable {PRECISION_ENV}='fp16' is not a precision"):
        resolve_precision("auto")
    assert resolve_precision("fp32") == "fp32"  # an explicit choice does not read the variable


def test_autocast_fp32_is_a_no_op_and_bf16_autocasts_a_tiny_matmul(cpu):
    cpu(False, False)
    a, b = torch.randn(4, 3), torch.randn(3, 2)
    for precision in ("fp32", "auto"):
        with autocast(precision, "cpu"):
            assert not torch.is_autocast_enabled("cpu")
            assert torch.equal(a @ b, a.matmul(b)) and (a @ b).dtype == torch.float32
    with autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        out = a @ b
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), a @ b, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("native", [False, True], ids=["avx2-like", "amx-like"])
def test_trainer_autocast_auto_follows_the_cpu_and_the_run_records_what_ran(cpu, tmp_path, native):
    cpu(native, False)
    assert TrainerConfig().autocast == "auto"
    ran = "bf16" if native else "none"
    assert TrainerConfig(autocast="auto").resolved_autocast() == ran
    mixture = ring_mixture(shape=SHAPE)
    data = FunctionData(lambda k: mixture_batch(mixture, 4, torch.Generator().manual_seed(k)))
    trainer = DistillationTrainer(make_neural_model(), data, TrainerConfig(iterations=1, run_dir=str(tmp_path),
                                                                           progress=False))
    assert trainer.autocast == ran and trainer.scaler is None
    with trainer._autocast():
        assert torch.is_autocast_enabled("cpu") == native
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == (torch.bfloat16 if native else torch.float32)
    trainer.fit()  # one iteration of a tiny MLP
    written = json.loads((tmp_path / "config.json").read_text())["trainer"]
    assert written["autocast"] == "auto" and written["autocast_resolved"] == ran
    assert json.loads((trainer.last_checkpoint / "trainer_state.json").read_text())["autocast"] == ran
    for explicit in ("none", "bf16", "fp16"):
        assert TrainerConfig(autocast=explicit).resolved_autocast() == explicit


def test_toy_teacher_precision_is_checked_and_on_its_command(cpu):
    from distill_mixins.cli import build_parser

    assert TeacherTrainConfig().precision == "auto"
    with pytest.raises(ValueError, match="TeacherTrainConfig.precision='bogus' is not a precision"):
        TeacherTrainConfig(precision="bogus")
    parse = build_parser().parse_args
    assert parse(["toy-teacher"]).precision is None  # the config's default (auto)
    assert parse(["toy-teacher", "--precision", "bf16"]).precision == "bf16"
    assert parse(["toy-teacher", "--no-bf16"]).precision == "fp32"
    with pytest.raises(SystemExit):
        parse(["toy-teacher", "--precision", "fp16"])
