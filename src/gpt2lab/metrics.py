"""What a training run reports: metrics.jsonl (see MetricsWriter), model FLOPs utilisation, the
progress line, and plots of one run or several."""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO

import torch

from .errors import GPT2LabError
from .fileio import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from .train.wandb_log import WandbRun

METRICS_FILE = "metrics.jsonl"


class Peak(NamedTuple):
    """Dense (no sparsity) peak TFLOP/s of one GPU per matmul precision; None where it has no such unit."""

    bf16: float | None  # bf16 tensor cores, fp32 accumulate
    fp16: float | None  # fp16 tensor cores, fp32 accumulate (what autocast's GEMMs use)
    tf32: float | None  # TF32 tensor cores: float32 matmuls under set_float32_matmul_precision("high")
    fp32: float  # plain float32 (CUDA cores)


# Peaks by the exact name torch.cuda.get_device_name() reports (compared case- and space-insensitively),
# from NVIDIA's data sheets, halving the figures they give "with sparsity". Exact names, because
# substrings mislead: "NVIDIA L40" contains "L4" (181 vs 121 TFLOP/s) and "NVIDIA H200 NVL" contains
# "H200" (835 vs 989). A GPU not listed (or a MIG slice of one) gets no MFU rather than a wrong one.
GPU_PEAKS_TFLOPS: dict[str, Peak] = {
    # "NVIDIA H100 Tensor Core GPU" datasheet: SXM5, PCIe and NVL columns.
    "NVIDIA H100 80GB HBM3": Peak(989.5, 989.5, 494.5, 67.0),  # H100 SXM
    "NVIDIA H100 PCIe": Peak(756.5, 756.5, 378.0, 51.0),
    "NVIDIA H100 NVL": Peak(835.5, 835.5, 417.5, 60.0),
    # "NVIDIA H200 Tensor Core GPU" datasheet: H200 SXM and H200 NVL columns.
    "NVIDIA H200": Peak(989.5, 989.5, 494.5, 67.0),
    "NVIDIA H200 NVL": Peak(835.5, 835.5, 417.5, 60.0),
    # "NVIDIA GH200 Grace Hopper Superchip" datasheet (the dense figures are printed there).
    "NVIDIA GH200 480GB": Peak(990.0, 990.0, 494.0, 67.0),
    # "NVIDIA A100 Tensor Core GPU" datasheet: the same peaks for 40/80 GB, SXM and PCIe.
    "NVIDIA A100-SXM4-80GB": Peak(312.0, 312.0, 156.0, 19.5),
    "NVIDIA A100-SXM4-40GB": Peak(312.0, 312.0, 156.0, 19.5),
    "NVIDIA A100-PCIE-40GB": Peak(312.0, 312.0, 156.0, 19.5),
    "NVIDIA A100 80GB PCIe": Peak(312.0, 312.0, 156.0, 19.5),
    # "NVIDIA L4 Tensor Core GPU" datasheet.
    "NVIDIA L4": Peak(121.0, 121.0, 60.0, 30.3),
    # "NVIDIA L40 GPU Accelerator" datasheet.
    "NVIDIA L40": Peak(181.05, 181.05, 90.5, 90.5),
    # "NVIDIA L40S GPU" datasheet.
    "NVIDIA L40S": Peak(362.05, 362.05, 183.0, 91.6),
    # "NVIDIA A10 Tensor Core GPU" datasheet.
    "NVIDIA A10": Peak(125.0, 125.0, 62.5, 31.2),
    # AWS's variant of the A10 (EC2 G5) has no NVIDIA datasheet; these are the figures published for
    # G5 instances, half the A10's tensor rate (Baseten, "NVIDIA A10 vs A10G for ML model inference").
    "NVIDIA A10G": Peak(70.0, 70.0, 35.0, 35.0),
    # "NVIDIA T4 Tensor Core GPU" datasheet: fp16 "mixed precision" tensor cores, no bf16 or TF32.
    "Tesla T4": Peak(None, 65.0, None, 8.1),
    # "NVIDIA Tesla V100 GPU Accelerator" datasheet: SXM2 and PCIe (16 and 32 GB alike), V100S PCIe;
    # Volta's tensor cores do fp16 only.
    "Tesla V100-SXM2-16GB": Peak(None, 125.0, None, 15.7),
    "Tesla V100-SXM2-32GB": Peak(None, 125.0, None, 15.7),
    "Tesla V100-PCIE-16GB": Peak(None, 112.0, None, 14.0),
    "Tesla V100-PCIE-32GB": Peak(None, 112.0, None, 14.0),
    "Tesla V100S-PCIE-32GB": Peak(None, 130.0, None, 16.4),
    # "NVIDIA Ada GPU Architecture" whitepaper, appendix (GeForce RTX 4090): fp32-accumulate rates,
    # half the fp16-accumulate ones on GeForce cards.
    "NVIDIA GeForce RTX 4090": Peak(165.2, 165.2, 82.6, 82.6),
    # "NVIDIA Ampere GA102 GPU Architecture" whitepaper (GeForce RTX 3090), fp32 accumulate.
    "NVIDIA GeForce RTX 3090": Peak(71.0, 71.0, 35.6, 35.6),
}

_PEAKS_BY_KEY = {" ".join(name.split()).casefold(): peak for name, peak in GPU_PEAKS_TFLOPS.items()}


def gpu_peak_flops(name: str, dtype: torch.dtype | None, tf32: bool = True) -> float | None:
    """Peak FLOP/s of the GPU called `name` (as torch.cuda.get_device_name reports it) for matmuls
    under autocast `dtype` (None: float32, counted at the TF32 tensor-core peak when `tf32` is on and
    the GPU has TF32, else at the plain float32 peak), or None for a GPU or precision not in the table."""
    peak = _PEAKS_BY_KEY.get(" ".join(name.split()).casefold())
    if peak is None:
        return None
    if dtype == torch.bfloat16:
        tflops = peak.bf16
    elif dtype == torch.float16:
        tflops = peak.fp16
    elif dtype is None or dtype == torch.float32:
        tflops = peak.tf32 if tf32 and peak.tf32 is not None else peak.fp32
    else:
        tflops = None
    return None if tflops is None else tflops * 1e12


def peak_flops(device: torch.device, dtype: torch.dtype | None = torch.bfloat16) -> float | None:
    """Peak FLOP/s of one device of this kind for autocast `dtype` (None: float32, where TF32 counts
    if float32 matmuls use it, i.e. torch.get_float32_matmul_precision() is not "highest"), or None
    where unknown (CPUs, MPS, GPUs not in GPU_PEAKS_TFLOPS)."""
    if device.type != "cuda":
        return None
    tf32 = torch.get_float32_matmul_precision() != "highest"
    return gpu_peak_flops(torch.cuda.get_device_name(device), dtype, tf32)


def mfu(flops_per_token: float, tokens_per_sec: float, peak: float | None, num_devices: int = 1) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None without a known peak."""
    if peak is None or tokens_per_sec <= 0:
        return None
    return flops_per_token * tokens_per_sec / (peak * num_devices)


def progress_text(rec: dict[str, Any]) -> str:
    """The tqdm postfix of a train record: loss, lr, grad norm, tokens/s and MFU."""
    parts = [f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.2e}", f"norm {rec['grad_norm']:.3f}"]
    tps = rec.get("tokens_per_sec") or 0.0
    parts.append(f"{tps / 1000:.1f}k tok/s" if tps >= 1000 else f"{tps:.0f} tok/s")
    if rec.get("mfu") is not None:
        parts.append(f"MFU {100 * rec['mfu']:.1f}%")
    return " | ".join(parts)


class MetricsWriter:
    """Appends records to RUN/metrics.jsonl (and optionally TensorBoard and wandb). Only rank 0 makes one.

    One JSON object per line, with a "kind" (train, eval, sample, event) and `step`, the optimizer steps
    completed, e.g. {"kind": "train", "step": 10, "loss": 4.21, "lr": 6e-4, "grad_norm": 0.9, "tokens":
    5242880, "tokens_per_sec": 512000.0, "mfu": 0.47, "step_time": 1.02, "elapsed": 10.7}. The file is
    appended to, never rewritten per step (that costs O(steps^2)): flushed per line, fsynced per checkpoint.
    """

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = False, wandb: WandbRun | None = None) -> None:
        self._wandb = wandb  # made by the caller (it needs the config); gets every record too
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise GPT2LabError("train.tensorboard needs the tensorboard package: pip install tensorboard") from None
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (lives with the writer)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        if self._tb is not None and record.get("kind") in ("train", "eval"):
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])
        if self._wandb is not None:
            self._wandb.log(record)

    def sync(self) -> None:
        """Make every record so far durable (called with each checkpoint)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of RUN/metrics.jsonl, skipping a torn (half-written) line."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise GPT2LabError(f"{path} not found: {run_dir} is not a gpt2lab run directory")
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records


def truncate_metrics(run_dir: str | os.PathLike, step: int) -> None:
    """Rewrite RUN/metrics.jsonl (atomically) keeping only the records up to `step`: what a run resumed
    from the checkpoint at `step` has not yet redone. With step 0 the log starts empty."""
    path = Path(run_dir) / METRICS_FILE
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step] if path.is_file() and step > 0 else []
    atomic_write_text(path, "".join(json.dumps(r, allow_nan=True) + "\n" for r in kept))


def _ema(values: Sequence[float], alpha: float) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out


def plot_runs(run_dirs: Iterable[str | os.PathLike], out: str | os.PathLike, x: str = "step") -> Path:
    """Write a PNG comparing runs: train loss (raw, faint, and smoothed) and val loss on one panel;
    any other eval numbers (HellaSwag accuracy ...) on a second. `x` is "step" or "tokens"."""
    plt = _pyplot()
    runs = [(Path(d), read_metrics(d)) for d in run_dirs]
    extra_keys = _extra_eval_keys(recs for _, recs in runs)
    ncols = 2 if extra_keys else 1
    fig, axes = plt.subplots(1, ncols, figsize=(7 * ncols, 4.5), squeeze=False)
    loss_ax, evals_ax = axes[0][0], (axes[0][1] if extra_keys else None)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run_dir, recs) in enumerate(runs):
        label, color = run_dir.name or str(run_dir), colors[i % len(colors)]
        scale = _tokens_per_step(recs) if x == "tokens" else 1
        _plot_losses(loss_ax, recs, label, color, scale)
        if evals_ax is not None:
            _plot_evals(evals_ax, recs, extra_keys, label, color, scale)
    _plot_references(loss_ax, evals_ax, [d for d, _ in runs], extra_keys)
    _label_axes(loss_ax, evals_ax, x)
    fig.tight_layout()
    out = Path(out)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display needed), or a one-line error."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GPT2LabError("plotting needs matplotlib: pip install 'gpt2lab[plot]'") from None
    return plt


def _extra_eval_keys(runs: Iterable[list[dict[str, Any]]]) -> list[str]:
    """The numeric eval keys other than val loss, across all runs, sorted: the second panel's lines."""
    skip = ("kind", "step", "tokens", "val_loss", "val_tokens")
    return sorted(
        {
            k
            for recs in runs
            for r in recs
            if r.get("kind") == "eval"
            for k, v in r.items()
            if k not in skip and isinstance(v, (int, float))
        }
    )


def _tokens_per_step(recs: list[dict[str, Any]]) -> float:
    """A run's tokens per optimizer step, from its last train record (0 without one)."""
    train = [r for r in recs if r.get("kind") == "train" and _finite(r.get("loss"))]
    return (train[-1]["tokens"] / train[-1]["step"]) if train and train[-1].get("step") else 0


def _plot_losses(ax: Any, recs: list[dict[str, Any]], label: str, color: str, scale: float) -> None:
    train = [r for r in recs if r.get("kind") == "train" and _finite(r.get("loss"))]
    if train:
        losses = [r["loss"] for r in train]
        ax.plot(_xs(train, scale), losses, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(_xs(train, scale), _ema(losses, 0.9), color=color, label=f"{label} train")
    val = [r for r in recs if r.get("kind") == "eval" and _finite(r.get("val_loss"))]
    if val:
        ax.plot(
            _xs(val, scale),
            [r["val_loss"] for r in val],
            color=color,
            linestyle="--",
            marker="o",
            markersize=3,
            label=f"{label} val ({val[-1]['val_loss']:.3f})",
        )


def _plot_evals(ax: Any, recs: list[dict[str, Any]], keys: list[str], label: str, color: str, scale: float) -> None:
    for j, key in enumerate(keys):
        pts = [r for r in recs if r.get("kind") == "eval" and _finite(r.get(key))]
        if pts:
            ax.plot(
                _xs(pts, scale),
                [r[key] for r in pts],
                color=color,
                marker="o",
                markersize=3,
                linestyle=["-", "--", ":", "-."][j % 4],
                label=f"{label} {key}",
            )


def _plot_references(loss_ax: Any, evals_ax: Any, run_dirs: list[Path], extra_keys: list[str]) -> None:
    """OpenAI's GPT-2 as gray lines, where the runs measure what it was measured on."""
    if any(_fineweb_edu(run_dir) for run_dir in run_dirs):
        # build-nanogpt's yardstick: OpenAI's GPT-2 (124M) on the same FineWeb-Edu val tokens
        from .eval import VAL_LOSS_REFERENCES

        ref = VAL_LOSS_REFERENCES["gpt2-124M"]
        loss_ax.axhline(ref, color="gray", linestyle=":", linewidth=1, label=f"OpenAI GPT-2 124M val ({ref})")
    if "hellaswag_acc_norm" in extra_keys:
        from .eval import HELLASWAG_REFERENCES

        for (name, value), style in zip(HELLASWAG_REFERENCES.items(), (":", "-.")):
            evals_ax.axhline(value, color="gray", linestyle=style, linewidth=1, label=f"{name} ({value})")


def _label_axes(loss_ax: Any, evals_ax: Any, x: str) -> None:
    loss_ax.set_xlabel("tokens" if x == "tokens" else "step")
    loss_ax.set_ylabel("loss (nats per token)")
    loss_ax.set_title("train / val loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=8)
    if evals_ax is not None:
        evals_ax.set_xlabel(loss_ax.get_xlabel())
        evals_ax.set_title("evaluations")
        evals_ax.grid(alpha=0.3)
        evals_ax.legend(fontsize=8)


def _fineweb_edu(run_dir: Path) -> bool:
    """Whether a run trained on FineWeb-Edu (its config's data directory was made from it)."""
    from .train.config import load_toml

    try:
        data_dir = Path(load_toml(run_dir / "config.toml")["data"]["dir"])
        manifest = data_dir / "manifest.json"
        if manifest.is_file():
            return "fineweb-edu" in json.dumps(json.loads(manifest.read_text()).get("source")).lower()
        return any(data_dir.glob("edu_fineweb_val_*.bin"))  # llm.c's shards
    except (GPT2LabError, OSError, ValueError, KeyError):
        return False


def _xs(records: list[dict[str, Any]], scale: float) -> list[float]:
    return [r["step"] * scale for r in records]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
