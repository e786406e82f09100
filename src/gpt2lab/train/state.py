"""The components of a training run's state, each a `Stateful` (torchtitan's state_dict /
load_state_dict): the model and the optimizer (whole, or sharded under FSDP), the counters, and the
RNGs. checkpoint.py saves and restores them together; docs/formats.md has the files they become.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..checkpoint import model_weights
from ..errors import GPT2LabError
from ..model import GPT, unwrap
from ..runtime import rng_state, set_rng_state
from .optim import check_same_optimizer, load_optimizer_state, optimizer_state_tensors


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ModelState:
    """The model's weights: the stored tensors on save, copied in bit for bit on load.

    Loading copies into the existing parameters (it does not replace them), so an optimizer built
    over them, a torch.compile wrapper and DDP's hooks all stay attached.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model: GPT = unwrap(model)

    def state_dict(self) -> dict[str, Any]:
        return model_weights(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        own = model_weights(self.model)
        check_weights(state, own)
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(state[name])


class ShardedModelState:
    """A sharded (FSDP2) model's weights: DCP's state dict of DTensors holding this rank's rows on save;
    a whole-model state (ModelState's, from a DDP or one-process checkpoint) is cut into this rank's
    shards on load."""

    def __init__(self, model: GPT) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model)

    def full_weights(self) -> dict[str, torch.Tensor]:
        """The whole weights on rank 0's CPU (the tied lm_head once), {} on the other ranks; every rank
        must call it (each tensor is all-gathered in turn, so at most one whole tensor is on a device
        at a time, and rank 0 holds one float32 copy of the model in host memory)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v for k, v in full.items() if k != "lm_head.weight"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        with torch.device("meta"):
            own = model_weights(GPT(self.model.config))
        check_weights(state, own)
        full = {**state, "lm_head.weight": state["transformer.wte.weight"]}
        set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True))


class OptimizerState:
    """AdamW's state tensors and parameter groups (see optim.optimizer_state_tensors)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        tensors, meta = optimizer_state_tensors(self.optimizer)
        return {"tensors": tensors, **meta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_optimizer_state(self.optimizer, state["tensors"], state)


class ShardedOptimizerState:
    """AdamW over sharded parameters: DCP's optimizer state ({"state": {fqn: {key: DTensor}}}) on save;
    OptimizerState's whole-model tensors are cut into this rank's shards on load."""

    def __init__(self, model: GPT, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return {"state": get_optimizer_state_dict(self.model, self.optimizer)["state"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        check_param_names(self.optimizer, state.get("param_groups", []))
        per_param: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in state["tensors"].items():
            param, _, key = name.rpartition(".")
            per_param.setdefault(param, {})[key] = tensor
        groups = get_optimizer_state_dict(self.model, self.optimizer)["param_groups"]
        full = {"state": per_param, "param_groups": groups}
        set_optimizer_state_dict(self.model, self.optimizer, full, options=StateDictOptions(full_state_dict=True))


def model_and_optimizer_states(model: GPT, optimizer: torch.optim.Optimizer, sharded: bool) -> dict[str, Stateful]:
    """The "model" and "optimizer" components of a run, sharded (FSDP2) or whole."""
    if sharded:
        return {"model": ShardedModelState(model), "optimizer": ShardedOptimizerState(model, optimizer)}
    return {"model": ModelState(model), "optimizer": OptimizerState(optimizer)}


def check_weights(state: dict[str, Any], own: dict[str, torch.Tensor]) -> None:
    """`state` names exactly the tensors of `own`, with their shapes; else GPT2LabError."""
    missing = sorted(set(own) - set(state))
    if missing:
        raise GPT2LabError(f"missing weight {missing[0]}")
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise GPT2LabError(f"unexpected weight {unexpected[0]}")
    for name, param in own.items():
        if tuple(state[name].shape) != tuple(param.shape):
            raise GPT2LabError(f"weight {name} has shape {list(state[name].shape)}, the model's is {list(param.shape)}")


def check_param_names(optimizer: torch.optim.Optimizer, saved_groups: list[dict[str, Any]]) -> None:
    """The saved parameter groups are this optimizer's and name its parameters, in order; else GPT2LabError."""
    check_same_optimizer(saved_groups, optimizer)
    if [g.get("names") for g in saved_groups] != [g["names"] for g in optimizer.param_groups]:
        raise GPT2LabError("optimizer state names other parameters than this model's; it belongs to another model")


@dataclass
class Counters:
    """How far the run is: optimizer steps done, training tokens consumed, non-finite steps skipped,
    and the lowest validation loss seen (math.inf before the first)."""

    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    best_val_loss: float = math.inf

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "skipped_steps": self.skipped_steps,
            # JSON has no infinity: None until a validation loss was measured.
            "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        best = state.get("best_val_loss")
        self.best_val_loss = math.inf if best is None else float(best)


class RNGState:
    """This process's global random number generators (dropout masks, anything drawn from numpy or
    `random`), as JSON-ready values (see runtime.rng_state)."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)
