"""The processor description that run records and benchmark sections carry."""

import builtins
import platform

import torch

from gmmseg_core import _machine


def test_the_description_names_the_model_and_the_simd_level_of_torchs_kernels():
    text = _machine.cpu_description()
    name, _, level = text.rpartition(", ")
    assert name and level == torch.backends.cpu.get_cpu_capability()


def test_without_proc_cpuinfo_the_description_falls_back_to_what_platform_knows(monkeypatch):
    real_open = builtins.open

    def no_cpuinfo(path, *args, **kwargs):
        if str(path) == "/proc/cpuinfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_cpuinfo)
    monkeypatch.setattr(platform, "processor", lambda: "")
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    assert _machine.cpu_description() == f"riscv64, {torch.backends.cpu.get_cpu_capability()}"
    monkeypatch.delattr(torch.backends.cpu, "get_cpu_capability")       # a torch without the query
    assert _machine.cpu_description() == "riscv64"


def test_kernel_caps_are_the_cap_variables_set_in_the_environment(monkeypatch):
    for name in _machine.KERNEL_CAP_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert _machine.kernel_caps() == {}
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")                       # not a kernel cap
    assert _machine.kernel_caps() == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
