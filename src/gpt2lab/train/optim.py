"""AdamW with GPT-2's parameter groups (or Muon for the blocks' matrices), and the learning-rate
schedule as a pure function of the step.

Weight decay applies to the matrices (attention, MLP, embeddings: every parameter with >= 2 dims) and
not to biases and LayerNorm gains, as in GPT-3's and build-nanogpt's recipe (Loshchilov & Hutter 2019
for decoupled decay). With `optim.name = "muon"` the attention and MLP matrices of the blocks take Muon
(momentum, then the update orthogonalized by a Newton-Schulz iteration: Jordan et al. 2024, as in
modded-nanogpt and nanochat) at their own peak rate `muon_lr`; the embeddings, biases and LayerNorms
keep AdamW. Both follow the same schedule: linear warmup to `lr`, then cosine (or linear) decay to
`min_lr` at `max_steps` (GPT-3 paper, appendix B; build-nanogpt's `get_lr`); `Schedule` sets it on the
optimizer step by step, and with `optim.fit_schedule_to_time` it keeps pace with the time limit too.

The optimizer state is saved without pickle: every state tensor goes into a safetensors file under the
name `<parameter name>.<state key>` and the hyper-parameters into JSON (see `optimizer_state_tensors`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ..errors import GPT2LabError
from ..model import unwrap
from .config import OptimSection


def lr_at(step: float, optim: OptimSection, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based; a fraction where a clock sets the pace, see
    `Schedule`) of a run of `max_steps` steps.

    Warmup reaches `lr` at the end of step `warmup_steps - 1` ((step + 1) / warmup, so step 0 already
    moves); afterwards the rate decays from `lr` at step `warmup_steps` to `min_lr` at `max_steps`.
    """
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant" or max_steps <= optim.warmup_steps:
        return optim.lr
    progress = min(1.0, (step - optim.warmup_steps) / (max_steps - optim.warmup_steps))
    if optim.schedule == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    else:  # linear
        coeff = 1.0 - progress
    return optim.min_lr + coeff * (optim.lr - optim.min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: parameters with >= 2 dims decay, the others (biases, LayerNorms) do not.

    Tied parameters appear once (named_parameters skips duplicates), so the shared wte / lm_head
    matrix is decayed once. Each group also carries the names of its parameters, in order, which is
    how optimizer state is saved and matched on load.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append((name, p))
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]


def muon_param_groups(model: nn.Module, optim: OptimSection) -> list[dict[str, Any]]:
    """`param_groups` with the blocks' matrices (attention and MLP weights: the blocks' 2-dim parameters)
    moved into a third group for Muon, at `muon_lr` (as a multiple of `lr`, so the schedule scales
    both) with `muon_weight_decay`. The embeddings stay with AdamW: Muon is for hidden layers' matrices,
    and the tied wte / lm_head is both the first layer and the last."""
    decay, no_decay = param_groups(model, optim.weight_decay)
    in_blocks = {id(p) for p in unwrap(model).transformer.h.parameters()}
    hidden = [i for i, p in enumerate(decay["params"]) if id(p) in in_blocks]
    keep = [i for i in range(len(decay["names"])) if i not in hidden]
    muon = {
        "params": [decay["params"][i] for i in hidden],
        "names": [decay["names"][i] for i in hidden],
        "weight_decay": optim.muon_weight_decay,
        "lr": optim.muon_lr,
        "muon": True,
        "lr_scale": optim.muon_lr / optim.lr,
    }
    decay = {**decay, "params": [decay["params"][i] for i in keep], "names": [decay["names"][i] for i in keep]}
    return [decay, no_decay, muon]


# The quintic Newton-Schulz iteration's coefficients (Jordan et al. 2024): they push every singular
# value of the normalized matrix towards 1 in five steps, to somewhere in about [0.7, 1.2].
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """About U V^T for G = U S V^T (the nearest semi-orthogonal matrix), by a Newton-Schulz iteration,
    for one matrix (m, n) or a stack of them (k, m, n), in g's dtype.

    Each step is X <- a X + (b A + c A^2) X with A = X X^T, on the wide orientation (m <= n), so the Gram
    matrices are the small ones; X starts as G over its Frobenius norm, so every singular value is <= 1.
    """
    a, b, c = NS_COEFFICIENTS
    wide = g.size(-2) <= g.size(-1)
    x = g if wide else g.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT  # (.., m, m)
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x if wide else x.mT


class MuonAdamW(torch.optim.AdamW):
    """Muon for the groups marked `"muon": True`, AdamW (fused where PyTorch has it) for the others.

    A Muon step: the momentum buffer B <- mu B + G; the update is G + mu B (Nesterov), orthogonalized
    (`orthogonalize`), times sqrt(max(1, rows / cols)) so that tall and wide matrices move alike (the
    original Muon's scaling); decoupled weight decay as AdamW's. Matrices of one shape are
    orthogonalized together, as one batch. Its state is "momentum_buffer" per matrix, beside AdamW's
    "step", "exp_avg" and "exp_avg_sq" for the rest, so checkpoints save and load it the same way.

    ns_dtype: the iteration's dtype; bfloat16 on GPUs (as modded-nanogpt), float32 on CPUs, where
    bfloat16 matmuls are slow without bf16 instructions.
    """

    def __init__(self, groups: list[dict[str, Any]], *, momentum: float, ns_dtype: torch.dtype, **adamw: Any) -> None:
        super().__init__(groups, **adamw)
        self.momentum, self.ns_dtype = momentum, ns_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon_step()
        groups = self.param_groups
        try:  # AdamW's step over the other groups only
            self.param_groups = [g for g in groups if not g.get("muon")]
            super().step()
        finally:
            self.param_groups = groups
        return loss

    def _muon_step(self) -> None:
        mu = self.momentum
        for group in self.param_groups:
            if not group.get("muon"):
                continue
            by_shape: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(p.grad)
                by_shape.setdefault(tuple(p.shape), []).append((p, p.grad.add(buf, alpha=mu)))
            lr, wd = group["lr"], group["weight_decay"]
            for shape, items in by_shape.items():
                updates = torch.stack([u for _, u in items]).to(self.ns_dtype)  # (k, rows, cols)
                ortho = orthogonalize(updates)
                scale = max(1.0, shape[0] / shape[1]) ** 0.5
                for (p, _), o in zip(items, ortho.unbind(0)):
                    if wd:
                        p.mul_(1.0 - lr * wd)
                    p.add_(o.to(p.dtype), alpha=-lr * scale)


def build_optimizer(model: nn.Module, optim: OptimSection, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `param_groups(model)`, fused on CUDA and CPU; with `optim.name = "muon"`, MuonAdamW
    over `muon_param_groups(model)`.

    The fused implementation updates each parameter in one pass instead of about ten elementwise
    passes: one kernel for all parameters on CUDA (build-nanogpt), and on CPU a faster update of the
    50304 x C embedding that dominates a small model's optimizer step (bench/train_cpu.py measures it).
    """
    kwargs: dict[str, Any] = {}
    if device.type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kwargs["fused"] = True
    kwargs.update(lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    if optim.name == "muon":
        ns_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        return MuonAdamW(muon_param_groups(model, optim), momentum=optim.muon_momentum, ns_dtype=ns_dtype, **kwargs)
    return torch.optim.AdamW(param_groups(model, optim.weight_decay), **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate on every group, times the group's `lr_scale` (Muon's matrices) where it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class Schedule:
    """`lr_at` over a run of `max_steps` steps, applied to `optimizer` one step at a time.

    Its state is the number of steps scheduled so far, as torch's LRScheduler keeps `last_epoch`:
    `apply()` sets the rate of that step before the optimizer steps, `advance()` moves on after it.
    The rate is that of `position`: the step count, or further along where `follow_clock` paces the
    schedule by a time limit and the clock is ahead. The rates themselves come from the run's config,
    so a resumed run may change them with `--set`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, optim: OptimSection, max_steps: int) -> None:
        self.optimizer, self.optim, self.max_steps = optimizer, optim, max_steps
        self.step = 0
        self.position = 0.0  # where on the schedule the last applied step was
        self.last_lr = 0.0  # the rate apply() set last
        self._clock: Callable[[], float] | None = None

    def follow_clock(self, fraction: Callable[[], float]) -> None:
        """Keep pace with `fraction()`, the share of a time limit gone (0 to 1), as well as with the steps:
        the rest of the schedule is spread over the limit, so it ends, at `min_lr`, at the limit or at
        `max_steps`, whichever comes first (optim.fit_schedule_to_time)."""
        start = max(self.position, float(self.step))
        self._clock = lambda: start + min(1.0, fraction()) * (self.max_steps - start)

    def lr(self, step: int) -> float:
        """The rate of optimizer step `step` (0-based) by the step count alone."""
        return lr_at(step, self.optim, self.max_steps)

    def apply(self) -> float:
        """Set the rate of the next step on every parameter group; returns it."""
        self.position = max(self.position, float(self.step), self._clock() if self._clock else 0.0)
        self.last_lr = lr_at(self.position, self.optim, self.max_steps)
        set_lr(self.optimizer, self.last_lr)
        return self.last_lr

    def advance(self) -> None:
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        # The position is saved only where a clock moved it ahead of the steps.
        ahead = self.position > self.step
        return {"step": self.step, "position": self.position} if ahead else {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        step, position = state["step"], state.get("position", 0.0)
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise GPT2LabError(f"schedule state: step must be an integer >= 0, got {step!r}")
        if not isinstance(position, (int, float)) or isinstance(position, bool) or not position >= 0:
            raise GPT2LabError(f"schedule state: position must be a number >= 0, got {position!r}")
        self.step, self.position = step, float(position)


def optimizer_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The parameter groups' hyper-parameters and parameter names, JSON-ready (no tensors)."""
    return [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        for group in optimizer.param_groups
    ]


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state of `optimizer` as (tensors by "<param name>.<key>", JSON-ready hyper-parameters).

    Parameters are identified by name (from the "names" list of each group), not by position, so a
    checkpoint can be checked against the model it is loaded into.
    """
    tensors: dict[str, torch.Tensor] = {}
    groups = optimizer_groups(optimizer)
    for group in optimizer.param_groups:
        for name, p in zip(group["names"], group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    value = torch.tensor(value)
                tensors[f"{name}.{key}"] = value
    return tensors, {"param_groups": groups}


def optimizer_name(groups: list[dict[str, Any]]) -> str:
    """The optimizer that `groups` (an optimizer's param_groups, or those a checkpoint saved) belong
    to: "muon" where a group is marked for Muon (muon_param_groups), else "adamw"."""
    return "muon" if any(g.get("muon") for g in groups) else "adamw"


def check_same_optimizer(saved_groups: list[dict[str, Any]], optimizer: torch.optim.Optimizer, where: str = "") -> None:
    """GPT2LabError where a checkpoint's optimizer state is another optimizer's than this run's."""
    saved, own = optimizer_name(saved_groups), optimizer_name(optimizer.param_groups)
    if saved != own:
        raise GPT2LabError(
            f"{where}the optimizer state is {saved}'s and this run's optim.name is {own!r}: resume with "
            f"--set optim.name={saved}, or start a new run"
        )


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any], source: str = ""
) -> None:
    """Restore the state tensors `optimizer_state_tensors` saved, bit for bit, onto an optimizer built
    for the same model. Hyper-parameters come from the run's config (the learning rate from the
    schedule), so a resumed run may change, e.g., the weight decay with `--set`. Errors begin with
    `source` (the checkpoint) when one is given."""
    where = f"{source}: " if source else ""
    saved_groups = meta.get("param_groups", [])
    check_same_optimizer(saved_groups, optimizer, where)
    if len(saved_groups) != len(optimizer.param_groups):
        raise GPT2LabError(
            f"{where}optimizer state has {len(saved_groups)} parameter groups, expected "
            f"{len(optimizer.param_groups)}; it belongs to another model"
        )
    for group, saved in zip(optimizer.param_groups, saved_groups):
        if saved.get("names") != group["names"]:
            raise GPT2LabError(
                f"{where}optimizer state names other parameters than this model's; it belongs to another model"
            )
        for name, p in zip(group["names"], group["params"]):
            state = {}
            for key in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
                if f"{name}.{key}" in tensors:
                    t = tensors[f"{name}.{key}"]
                    # AdamW keeps `step` as a float32 scalar on the CPU unless it is fused/capturable.
                    target = p.device if (key != "step" or group.get("fused") or group.get("capturable")) else "cpu"
                    state[key] = t.to(device=target, dtype=t.dtype if key == "step" else p.dtype)
            if state:
                optimizer.state[p] = state
