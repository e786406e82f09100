"""MFU: GPU peaks looked up by exact device name, per precision; unknown GPUs report no MFU."""

from __future__ import annotations

import pytest
import torch

from gpt2lab.metrics import GPU_PEAKS_TFLOPS, gpu_peak_flops, mfu, peak_flops, progress_text

BF16, FP16, FP32 = torch.bfloat16, torch.float16, None

# (name as torch.cuda.get_device_name reports it, dense bf16, fp16, TF32, fp32 TFLOP/s)
EXPECTED = [
    ("NVIDIA H100 80GB HBM3", 989.5, 989.5, 494.5, 67.0),
    ("NVIDIA H100 PCIe", 756.5, 756.5, 378.0, 51.0),
    ("NVIDIA H100 NVL", 835.5, 835.5, 417.5, 60.0),
    ("NVIDIA H200", 989.5, 989.5, 494.5, 67.0),
    ("NVIDIA H200 NVL", 835.5, 835.5, 417.5, 60.0),
    ("NVIDIA GH200 480GB", 990.0, 990.0, 494.0, 67.0),
    ("NVIDIA A100-SXM4-80GB", 312.0, 312.0, 156.0, 19.5),
    ("NVIDIA A100-SXM4-40GB", 312.0, 312.0, 156.0, 19.5),
    ("NVIDIA A100-PCIE-40GB", 312.0, 312.0, 156.0, 19.5),
    ("NVIDIA A100 80GB PCIe", 312.0, 312.0, 156.0, 19.5),
    ("NVIDIA L4", 121.0, 121.0, 60.0, 30.3),
    ("NVIDIA L40", 181.05, 181.05, 90.5, 90.5),
    ("NVIDIA L40S", 362.05, 362.05, 183.0, 91.6),
    ("NVIDIA A10", 125.0, 125.0, 62.5, 31.2),
    ("NVIDIA A10G", 70.0, 70.0, 35.0, 35.0),
    ("Tesla T4", None, 65.0, None, 8.1),
    ("Tesla V100-SXM2-16GB", None, 125.0, None, 15.7),
    ("Tesla V100-SXM2-32GB", None, 125.0, None, 15.7),
    ("Tesla V100-PCIE-16GB", None, 112.0, None, 14.0),
    ("Tesla V100-PCIE-32GB", None, 112.0, None, 14.0),
    ("Tesla V100S-PCIE-32GB", None, 130.0, None, 16.4),
    ("NVIDIA GeForce RTX 4090", 165.2, 165.2, 82.6, 82.6),
    ("NVIDIA GeForce RTX 3090", 71.0, 71.0, 35.6, 35.6),
]


def tflops(value: float | None) -> float | None:
    return None if value is None else round(value / 1e12, 3)


def test_every_gpu_in_the_table_is_tested():
    assert sorted(GPU_PEAKS_TFLOPS) == sorted(name for name, *_ in EXPECTED)


@pytest.mark.parametrize("name,bf16,fp16,tf32,fp32", EXPECTED)
def test_peak_of_every_gpu_by_precision(name, bf16, fp16, tf32, fp32):
    assert tflops(gpu_peak_flops(name, BF16)) == bf16
    assert tflops(gpu_peak_flops(name, FP16)) == fp16
    # float32 counts at the TF32 tensor-core peak where TF32 is on and exists, else at the fp32 peak.
    assert tflops(gpu_peak_flops(name, FP32, tf32=True)) == (tf32 if tf32 is not None else fp32)
    assert tflops(gpu_peak_flops(name, torch.float32, tf32=False)) == fp32


def test_names_are_matched_whole_not_by_substring():
    assert tflops(gpu_peak_flops("NVIDIA L40", BF16)) == 181.05  # not the L4's 121
    assert tflops(gpu_peak_flops("NVIDIA L4", BF16)) == 121.0
    assert tflops(gpu_peak_flops("NVIDIA H200 NVL", BF16)) == 835.5  # not the H200's 989.5
    assert tflops(gpu_peak_flops("NVIDIA A10G", BF16)) == 70.0  # not the A10's 125
    for unknown in ("NVIDIA H100", "NVIDIA A100-SXM4-40GB MIG 1g.5gb", "NVIDIA B200", "NVIDIA L40S-Ultra", ""):
        assert gpu_peak_flops(unknown, BF16) is None, unknown


def test_names_are_compared_without_case_and_extra_spaces():
    assert tflops(gpu_peak_flops("  nvidia  h100 80gb   HBM3 ", BF16)) == 989.5
    assert tflops(gpu_peak_flops("TESLA T4", FP16)) == 65.0


def test_peak_of_a_cuda_device_follows_autocast_and_tf32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    cuda = torch.device("cuda", 0)
    assert tflops(peak_flops(cuda)) == 312.0  # bf16 by default
    assert tflops(peak_flops(cuda, FP16)) == 312.0
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert tflops(peak_flops(cuda, None)) == 156.0
        torch.set_float32_matmul_precision("highest")
        assert tflops(peak_flops(cuda, None)) == 19.5
    finally:
        torch.set_float32_matmul_precision(old)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert peak_flops(cuda, BF16) is None  # no bf16 units: no MFU rather than a made-up one
    assert peak_flops(torch.device("cpu")) is None


def test_unknown_peak_means_no_mfu_in_the_record_or_progress_line():
    assert mfu(6e9, 1000.0, None) is None
    assert mfu(6e9, 1000.0, 312e12, num_devices=2) == pytest.approx(6e12 / 624e12)
    record = {"loss": 3.25, "lr": 6e-4, "grad_norm": 0.5, "tokens_per_sec": 4500.0, "mfu": None}
    assert progress_text(record) == "loss 3.2500 | lr 6.00e-04 | norm 0.500 | 4.5k tok/s"
    assert progress_text({**record, "mfu": 0.4512}).endswith(" | MFU 45.1%")
