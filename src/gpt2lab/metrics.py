"""What a training run reports: metrics.jsonl, model FLOPs utilisation, the progress line, and plots.

metrics.jsonl holds one JSON object per line, each with a "kind":
  {"kind": "train", "step": 10, "loss": 4.21, "lr": 6e-4, "grad_norm": 0.9, "tokens": 5242880,
   "tokens_per_sec": 512000.0, "mfu": 0.47, "step_time": 1.02, "elapsed": 10.7}
  {"kind": "eval", "step": 250, "val_loss": 3.9, ...any other evaluation numbers (hellaswag_acc_norm ...)}
  {"kind": "sample", "step": 250, "prompt": "...", "text": "..."}
  {"kind": "event", "step": 300, "message": "resumed from ..."}
`step` counts completed optimizer steps. The file is an append-only log (rewriting it whole after every
step would cost O(steps^2)); lines are flushed as written and fsynced with every checkpoint. A torn last
line after a kill is skipped by `read_metrics`, and a resumed run first rewrites the file atomically
without the records past its checkpoint, so the log of a resumed run equals that of an unbroken one.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from .errors import GPT2LabError
from .fileio import atomic_write_bytes, atomic_write_text

METRICS_FILE = "metrics.jsonl"

# Dense (no sparsity) bf16 tensor-core peak FLOP/s per GPU, from NVIDIA's data sheets. MFU
# (PaLM paper, appendix B) = achieved model FLOP/s / (peak x GPUs); model FLOPs per token are
# GPT.estimate_flops_per_token. Matched against torch.cuda.get_device_name(), longest key first.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "A6000": 155e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16; V100 has no bf16
    "T4": 65e12,  # fp16
}


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of one device of this kind, or None where unknown (CPUs, MPS, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


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
    """Appends records to RUN/metrics.jsonl (and optionally TensorBoard). Only rank 0 makes one."""

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = False) -> None:
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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GPT2LabError("plotting needs matplotlib: pip install 'gpt2lab[plot]'") from None
    runs = [(Path(d), read_metrics(d)) for d in run_dirs]
    extra_keys = sorted(
        {
            k
            for _, recs in runs
            for r in recs
            if r.get("kind") == "eval"
            for k, v in r.items()
            if k not in ("kind", "step", "tokens", "val_loss", "val_tokens") and isinstance(v, (int, float))
        }
    )
    ncols = 2 if extra_keys else 1
    fig, axes = plt.subplots(1, ncols, figsize=(7 * ncols, 4.5), squeeze=False)
    ax = axes[0][0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run_dir, recs) in enumerate(runs):
        color = colors[i % len(colors)]
        train = [r for r in recs if r.get("kind") == "train" and _finite(r.get("loss"))]
        tokens_per_step = (train[-1]["tokens"] / train[-1]["step"]) if train and train[-1].get("step") else 0

        scale = tokens_per_step if x == "tokens" else 1

        label = run_dir.name or str(run_dir)
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
        for j, key in enumerate(extra_keys):
            pts = [r for r in recs if r.get("kind") == "eval" and _finite(r.get(key))]
            if pts:
                axes[0][1].plot(
                    _xs(pts, scale),
                    [r[key] for r in pts],
                    color=color,
                    marker="o",
                    markersize=3,
                    linestyle=["-", "--", ":", "-."][j % 4],
                    label=f"{label} {key}",
                )
    if any(_fineweb_edu(run_dir) for run_dir, _ in runs):
        # build-nanogpt's yardstick: OpenAI's GPT-2 (124M) on the same FineWeb-Edu val tokens
        from .eval import VAL_LOSS_REFERENCES

        ref = VAL_LOSS_REFERENCES["gpt2-124M"]
        ax.axhline(ref, color="gray", linestyle=":", linewidth=1, label=f"OpenAI GPT-2 124M val ({ref})")
    if "hellaswag_acc_norm" in extra_keys:
        from .eval import HELLASWAG_REFERENCES

        for (name, value), style in zip(HELLASWAG_REFERENCES.items(), (":", "-.")):
            axes[0][1].axhline(value, color="gray", linestyle=style, linewidth=1, label=f"{name} ({value})")
    ax.set_xlabel("tokens" if x == "tokens" else "step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("train / val loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if extra_keys:
        axes[0][1].set_xlabel(ax.get_xlabel())
        axes[0][1].set_title("evaluations")
        axes[0][1].grid(alpha=0.3)
        axes[0][1].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out


def _fineweb_edu(run_dir: Path) -> bool:
    """Whether a run trained on FineWeb-Edu (its config's data directory was made from it)."""
    from .config import load_toml

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
