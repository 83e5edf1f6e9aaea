"""runtime.precision=auto and the device probes, with the hardware injected: the choice
must not depend on the CPU the suite happens to run on."""

import pytest
import torch

from dist_diffusion.config import ConfigError, load_config
from dist_diffusion.runtime import distributed
from dist_diffusion.runtime.engine import deepspeed_config
from dist_diffusion.runtime.hardware import choose_precision, cpu_flags, cpu_native_bf16

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
ZEN3 = frozenset({"avx2", "fma", "f16c"})  # AMD EPYC Zen 3: AVX2, no AVX-512
SAPPHIRE_RAPIDS = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
COOPER_LAKE = frozenset({"avx2", "avx512f", "avx512_bf16"})


def choice(requested, flags, environ=None, where=CPU, gpu_bf16=None):
    return choose_precision(requested, where, flags=lambda: flags, environ=environ or {}, gpu_bf16=gpu_bf16)


@pytest.mark.parametrize("flags, expected", [(ZEN3, "fp32"), (SAPPHIRE_RAPIDS, "bf16"), (COOPER_LAKE, "bf16"),
                                             (frozenset(), "fp32")])
def test_auto_takes_bf16_only_where_the_cpu_has_it(flags, expected):
    picked = choice("auto", flags)
    assert picked.precision == expected and not picked.warning
    assert ("has native bf16" in picked.reason) == (expected == "bf16"), picked.reason


def test_onednn_cap_reproduces_an_avx2_cpu():
    """ONEDNN_MAX_CPU_ISA=AVX2, the way to reproduce an AVX2-only CPU, makes bf16 emulated
    even on an AMX machine, so auto must take fp32 there too."""
    capped = choice("auto", SAPPHIRE_RAPIDS, {"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert capped.precision == "fp32" and "ONEDNN_MAX_CPU_ISA=AVX2" in capped.reason
    assert choice("auto", SAPPHIRE_RAPIDS, {"ONEDNN_MAX_CPU_ISA": "avx512_core_amx"}).precision == "bf16"
    assert cpu_native_bf16(COOPER_LAKE, {"DNNL_MAX_CPU_ISA": "AVX512_CORE"})[0] is False


def test_explicit_bf16_on_a_cpu_without_it_warns_with_the_slowdown():
    kept = choice("bf16", ZEN3)
    assert kept.precision == "bf16"
    assert "25x" in kept.warning and "116x" in kept.warning and "runtime.precision=auto" in kept.warning
    assert "\n" not in kept.warning
    assert not choice("bf16", SAPPHIRE_RAPIDS).warning
    assert choice("fp32", SAPPHIRE_RAPIDS).precision == "fp32"


def test_gpu_choice_follows_the_gpu():
    assert choice("auto", ZEN3, where=CUDA, gpu_bf16=lambda: True).precision == "bf16"  # the host CPU is moot
    old = choice("auto", SAPPHIRE_RAPIDS, where=CUDA, gpu_bf16=lambda: False)
    assert old.precision == "fp32" and "before Ampere" in old.reason
    assert choice("bf16", ZEN3, where=CUDA, gpu_bf16=lambda: False).warning


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16 amx_tile\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16", "amx_tile"}
    assert cpu_flags(tmp_path / "absent") == frozenset()


def test_recipes_default_to_auto_and_deepspeed_gets_the_resolved_precision():
    for recipe in ("configs/tiny.yaml", "configs/vae_tiny.yaml", "configs/classifier_tiny.yaml"):
        assert load_config(recipe).runtime.precision == "auto", recipe
    assert load_config(None).runtime.precision == "auto"
    cfg = load_config("configs/tiny.yaml", ["runtime.precision=bf16"])
    assert deepspeed_config(cfg.train, cfg.runtime, 1)["bf16"]["enabled"] is True
    cfg = load_config("configs/tiny.yaml", ["runtime.precision=fp32"])
    assert deepspeed_config(cfg.train, cfg.runtime, 1)["bf16"]["enabled"] is False


def test_auto_device_with_a_driver_but_no_cuda_is_one_error():
    """A GPU node whose driver is too old for torch's CUDA: auto must not quietly train on the CPU."""
    with pytest.raises(ConfigError) as err:
        distributed.check_cuda_usable("auto", False, driver=lambda: "535.104.05", cuda_available=lambda: False)
    text = str(err.value)
    assert "535.104.05" in text and "runtime.device=cpu" in text and "\n" not in text
    assert f"CUDA {torch.version.cuda}" in text or "CPU build" in text
    # a machine without NVIDIA GPUs, or the CPU on purpose, or a working GPU: no error
    distributed.check_cuda_usable("auto", False, driver=lambda: None, cuda_available=lambda: False)
    distributed.check_cuda_usable("cpu", False, driver=lambda: "535.104.05", cuda_available=lambda: False)
    distributed.check_cuda_usable("auto", False, driver=lambda: "580.65", cuda_available=lambda: True)
    with pytest.raises(ConfigError, match="runtime.device=cuda"):
        distributed.check_cuda_usable("cuda", False, driver=lambda: None, cuda_available=lambda: False)
