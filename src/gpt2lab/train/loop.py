"""The training loop: from scratch or fine-tuning, one process or many (torchrun), resumable bit for bit.

One optimizer step (build-nanogpt's loop, llm.c's train_gpt2.py):

    lr = schedule.apply()                             # lr_at(step): a pure function of the step
    for each of grad_accum micro-steps:               # grad_accum = total_batch_tokens / (B * T * ranks)
        x, y = loader.next_batch()                    # this rank's (B, T) windows
        loss = model(x, y) / grad_accum; backward     # DDP syncs gradients on the last micro-step only
    all-reduce [loss, stop flag, out-of-time flag]    # every rank logs the same loss, stops together
    norm = clip_grad_norm_(...); check finite; optimizer.step()
    (float16 autocast: backward of the loss x scale, gradients unscaled before clipping, scale updated)

then, by the step count: log to metrics.jsonl, evaluate, checkpoint. A checkpoint at step N holds the
state after N steps, as a dict of components (train/state.py): weights, AdamW state, loss scaler,
schedule, counters, each rank's RNG states and loader position, so `--resume auto` continues exactly
as if the run had never stopped. SIGINT / SIGTERM finish the current step, write a checkpoint and
return; a second SIGINT aborts at once. train.max_minutes ends the run after the step that the next
one would take past the limit, evaluated and checkpointed like a last step.

Bit for bit holds on CPU. On GPUs, atomics in some kernels (flash attention's backward among them) make
two runs differ in the last bits unless `train.deterministic = true` (see runtime.deterministic).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import accel
from .. import checkpoint as ckpt
from .. import distributed as D
from ..accel import CpuLossKernel
from ..config import GPTConfig
from ..data import ShardLoader, data_tokenizer
from ..data.prefetch import PrefetchLoader
from ..data.shards import MANIFEST_NAME
from ..errors import GPT2LabError
from ..fileio import atomic_write_text
from ..metrics import MetricsWriter, mfu, peak_flops, progress_text, truncate_metrics
from ..runtime import (
    autocast,
    autocast_dtype,
    deterministic,
    deterministic_cublas,
    keep_freed_memory,
    needs_grad_scaler,
    seed_everything,
)
from ..tokenizer import Tokenizer, get_tokenizer
from .build import check_same_tokenizer, empty_model, fresh_model, pretrained_model
from .config import TrainConfig, to_toml
from .evaluate import EvalContext, EvalTask, Evaluator, describe, sample_text
from .optim import Schedule, build_optimizer
from .parallel import (
    check_fsdp_supported,
    clip_gradients,
    enable_activation_checkpointing,
    gathered_for_eval,
    shard_model,
)
from .saving import CheckpointWriter, find_resume
from .signals import StopRequest
from .state import (
    Counters,
    ModelState,
    OptimizerState,
    RNGState,
    ShardedModelState,
    ShardedOptimizerState,
    Stateful,
    check_param_names,
)

# The loop's clock: step times, elapsed time, train.max_minutes (a test can replace it).
_clock = time.perf_counter


@dataclass
class TrainResult:
    """How a call to `train` ended."""

    run_dir: Path
    step: int  # optimizer steps completed
    tokens: int  # training tokens consumed
    loss: float | None  # last train loss
    val_loss: float | None  # last val loss
    checkpoint: Path | None  # newest checkpoint
    interrupted: bool  # stopped by a signal or --stop-at before max_steps
    seconds: float


def gradient_accumulation(cfg: TrainConfig, world_size: int) -> int:
    """Micro-steps per optimizer step: total_batch_tokens / (batch_size x seq_len x ranks), exactly."""
    t = cfg.train
    per_micro = t.batch_size * t.seq_len * world_size
    if t.total_batch_tokens % per_micro:
        lower = max(per_micro, t.total_batch_tokens // per_micro * per_micro)
        raise GPT2LabError(
            f"train.total_batch_tokens ({t.total_batch_tokens:,}) must be a multiple of batch_size x seq_len x "
            f"ranks = {t.batch_size} x {t.seq_len} x {world_size} = {per_micro:,}; use e.g. {lower:,}, or change "
            "train.batch_size"
        )
    return t.total_batch_tokens // per_micro


def compile_backend(name: str) -> str:
    """`name` if torch.compile knows that backend (inductor, aot_eager, eager, ...), else a clear error."""
    import torch._dynamo

    if name not in torch._dynamo.list_backends(exclude_tags=()):
        raise GPT2LabError(
            f"train.compile_backend {name!r} is not a torch.compile backend (torch._dynamo.list_backends()); "
            "use inductor, or aot_eager / eager for a quick compile"
        )
    return name


def data_tokenizer_or_gpt2(data_dir: str) -> Tokenizer:
    """The tokenizer a prepared directory records (manifest.json); GPT-2's for llm.c's shards, which
    have no manifest. A missing directory is reported here, before any model is built."""
    root = Path(data_dir)
    if not root.is_dir():
        raise GPT2LabError(f"data directory {root} not found: prepare it first with 'gpt2lab prepare', or set data.dir")
    return data_tokenizer(root) if (root / MANIFEST_NAME).is_file() else get_tokenizer()


class Trainer:
    """One training run; `Trainer(cfg).run()` or the `train(cfg)` shortcut.

    Set-up is three steps: `_build` makes every component of the run (environment, data, model,
    optimizer, schedule, counters, evaluator), `_wrap` puts torch.compile and DDP around the model,
    and `_restore` loads a checkpoint's state into the components (or starts afresh); `_open_outputs`
    then readies the run directory.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        resume: str = "never",
        stop_at: int | None = None,
        eval_tasks: Sequence[EvalTask] = (),
        progress: bool = True,
    ) -> None:
        self.cfg, self.stop_at, self.progress = cfg, stop_at, progress
        self._build(resume, eval_tasks)
        self._wrap()
        self._restore()
        self._open_outputs()

    # ------------------------------------------------------------------------------------- set-up

    def _build(self, resume: str, eval_tasks: Sequence[EvalTask]) -> None:
        """The run's components, unwrapped; a resumed run's model has its shape, not yet its weights."""
        cfg, t = self.cfg, self.cfg.train
        cublas_in_time = deterministic_cublas() if t.deterministic else True  # before CUDA starts
        self.env = D.setup(t.device)
        self.device = self.env.device
        if not cublas_in_time and self.device.type == "cuda":
            raise GPT2LabError(
                "train.deterministic: CUDA was already started in this process without CUBLAS_WORKSPACE_CONFIG; "
                "set CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment before starting Python"
            )
        self.run_dir = Path(t.out_dir)
        self.grad_accum = gradient_accumulation(cfg, self.env.world_size)
        self.tokens_per_step = t.total_batch_tokens
        self.amp_dtype = autocast_dtype(t.precision, self.device)
        self.fsdp = t.parallel == "fsdp"
        if self.fsdp:
            check_fsdp_supported(self.env.distributed, self.amp_dtype)
        if self.device.type == "cuda":
            # TF32 for the float32 matmuls that remain (build-nanogpt); bf16 autocast does the rest.
            torch.set_float32_matmul_precision("high")
        # On a CPU, a step's large tensors (the loss's blocks of logits, the gradients) reuse the memory
        # of the step before instead of page-faulting in fresh mmaps (runtime.keep_freed_memory).
        self.memory_kept = self.device.type == "cpu" and keep_freed_memory()
        self.tokenizer = data_tokenizer_or_gpt2(cfg.data.dir)
        # A thread cuts the next batches while the device computes; pinned, they copy without blocking.
        self.loader = PrefetchLoader(
            ShardLoader(
                cfg.data.dir,
                "train",
                batch_size=t.batch_size,
                seq_len=t.seq_len,
                rank=self.env.rank,
                world_size=self.env.world_size,
                seed=t.seed,
                shuffle=cfg.data.shuffle,
                tokenizer=self.tokenizer,
            ),
            pin_memory=self.device.type == "cuda",
        )
        # The stop flag goes into the loss all-reduce as one of these device scalars: a tensor made
        # from a Python bool every step would be a blocking host-to-device copy.
        self._flags = (torch.zeros((), device=self.device), torch.ones((), device=self.device))

        self.resumed_from = find_resume(self.run_dir, resume, self.env)
        self._saved: dict[str, Any] | None = None
        seed_everything(t.seed)  # the same initial weights on every rank
        meta: dict[str, Any] = {}
        if self.resumed_from is not None:
            meta, self._saved = ckpt.load_training_checkpoint(self.resumed_from)
            check_same_tokenizer(meta.get("tokenizer"), self.tokenizer, f"checkpoint {self.resumed_from}")
            model = empty_model(GPTConfig.from_dict(meta["model"]), self.device)
        elif t.init_from:
            model = pretrained_model(cfg, self.tokenizer)
        else:
            model = fresh_model(cfg, self.tokenizer.n_vocab)
        if model.config.vocab_size != self.tokenizer.n_vocab:
            raise GPT2LabError(
                f"the model has a vocabulary of {model.config.vocab_size} tokens but {cfg.data.dir} was tokenized "
                f"with {self.tokenizer.name!r} ({self.tokenizer.n_vocab} tokens); prepare the data with the "
                "model's tokenizer"
            )
        if t.seq_len > model.config.block_size:
            raise GPT2LabError(
                f"train.seq_len ({t.seq_len}) is longer than the model's context ({model.config.block_size})"
            )
        self.model = model.to(self.device)
        self.loss_kernel, self.loss_kernel_how = self._loss_kernel(meta.get("training", {}).get("cpu_loss_kernel"))
        accel.use_fused_loss(self.model, self.loss_kernel)  # a no-op where GPT2LAB_ACCEL=0
        c = cfg.checkpoint
        self.checkpoints = CheckpointWriter(
            self.run_dir, self.env, model.config, self.tokenizer, c.keep_last, c.keep_best, sharded=self.fsdp
        )
        self.flops_per_token = model.estimate_flops_per_token(t.seq_len)
        self.peak = peak_flops(self.device, self.amp_dtype)
        if t.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        if self.fsdp:  # in place, before the optimizer: AdamW is built over the sharded parameters
            shard_model(self.model, self.device, self.amp_dtype)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        # float16 gradients underflow without loss scaling; for bf16 and float32 the scaler does nothing.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=needs_grad_scaler(self.amp_dtype))
        self.schedule = Schedule(self.optimizer, cfg.optim, t.max_steps)
        self.counters = Counters()
        self.rng = RNGState()
        self.evaluator = Evaluator(
            cfg.data.dir,
            self.tokenizer,
            cfg.eval.val_tokens,
            cfg.eval.tasks,
            eval_tasks,
            self.env.rank,
            self.env.world_size,
        )
        self.stop = StopRequest()
        self._deadline: float | None = None  # train.max_minutes after run() started (perf_counter)
        self._last_step_time = 0.0
        self.last_loss: float | None = None
        self.last_val: float | None = None
        self.val_step = -1  # the step last_val was measured at

    def _loss_kernel(self, saved: dict[str, Any] | None) -> tuple[CpuLossKernel | None, str]:
        """The float32 CPU loss's chunk size and exponential (gpt2lab/accel/loss.py): a resumed run keeps
        its own, a new one takes what is fastest on this machine (accel/tuning.py), rank 0's on every rank.
        None where that path is not taken (a GPU, autocast, GPT2LAB_ACCEL=0)."""
        t = self.cfg.train
        float32 = self.amp_dtype is None and next(self.model.parameters()).dtype == torch.float32
        if self.device.type != "cpu" or not float32 or not accel.enabled():
            return None, ""
        if saved:
            return CpuLossKernel.from_dict(saved), f"kept from {self.resumed_from}"
        mc = self.model.config
        chosen = None
        if self.env.is_main:
            kernel, how = accel.choose_cpu_loss_kernel(
                mc.n_embd, mc.vocab_size, mc.padded_vocab_size, t.batch_size * t.seq_len
            )
            chosen = (kernel.to_dict(), how)
        kernel_dict, how = D.broadcast_from_main(chosen, self.env)
        return CpuLossKernel.from_dict(kernel_dict), how

    def components(self) -> dict[str, Stateful]:
        """The run's state, by component name (see gpt2lab.train.state); PER_RANK ones differ by rank."""
        if self.fsdp:
            model: Stateful = ShardedModelState(self.model)
            optimizer: Stateful = ShardedOptimizerState(self.model, self.optimizer)
        else:
            model, optimizer = ModelState(self.model), OptimizerState(self.optimizer)
        return {
            "model": model,
            "optimizer": optimizer,
            "grad_scaler": self.scaler,
            "schedule": self.schedule,
            "counters": self.counters,
            "loader": self.loader,
            "rng": self.rng,
        }

    def _wrap(self) -> None:
        """`train_model`: the model as the steps call it, compiled and/or under DDP; `self.model`
        stays the plain GPT (evaluation, sampling and checkpoints use it). Under FSDP `self.model` is
        already sharded in place (in `_build`); FSDP2's hooks are closed to Dynamo, so the root's
        forward runs eagerly and each block's forward, between its all-gather and reshard, is compiled
        (tests/test_train_fsdp.py checks the losses and that graphs were made)."""
        t = self.cfg.train
        self.train_model: torch.nn.Module = self.model
        if t.compile:
            self.train_model = torch.compile(self.model, backend=compile_backend(t.compile_backend))
        if self.env.distributed and not self.fsdp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DDP(self.train_model, device_ids=ids)

    def _restore(self) -> None:
        """Every component from the checkpoint found by `_find_resume`, or a fresh start's RNG."""
        seed, rank, world_size = self.cfg.train.seed, self.env.rank, self.env.world_size
        saved, source = self._saved, self.resumed_from
        self._saved = None  # the weights are copied into the model: no second copy is kept
        self.last_ckpt = source
        if saved is None:
            if world_size > 1:
                torch.manual_seed(seed + rank)  # dropout masks differ between ranks, as between micro-steps
            return
        ranks = saved["ranks"]
        same_ranks = len(ranks) == world_size
        # The loader position is global (the same on every rank), so it carries over to another world size;
        # the RNG states belong to their ranks.
        states = {**saved, **(ranks[rank] if same_ranks else {"loader": ranks[0]["loader"]})}
        try:
            if "sharded" in saved:  # DCP's shards, onto this run's ranks, sharded or not
                check_param_names(self.optimizer, saved["optimizer"].get("param_groups", []))
                ckpt.load_sharded_state(
                    saved["sharded"], self.model, self.optimizer, saved["optimizer"].get("param_groups", [])
                )
                states = {k: v for k, v in states.items() if k not in ("model", "optimizer")}
            for name, component in self.components().items():
                if states.get(name):  # absent or {}: e.g. no loss scaler was saved; the fresh one stays
                    component.load_state_dict(states[name])
        except GPT2LabError as e:
            raise GPT2LabError(f"{source}: {e}") from None
        if not same_ranks:  # another number of ranks: the data order continues, dropout masks are drawn afresh
            torch.manual_seed(seed + self.counters.step + rank)

    def _open_outputs(self) -> None:
        self.writer = None
        if self.env.is_main:
            truncate_metrics(self.run_dir, self.counters.step)  # nothing past the checkpoint we continue from
            self.writer = MetricsWriter(self.run_dir, self.cfg.train.tensorboard)
            atomic_write_text(self.run_dir / "config.toml", to_toml(self.cfg))
            ckpt.remove_stale_temporaries(self.run_dir)

    # ------------------------------------------------------------------------------------- the loop

    def run(self) -> TrainResult:
        """Train to max_steps (or a stop request); returns how it ended. Non-finite losses and failed
        checkpoint writes raise GPT2LabError, leaving the last good checkpoint as it was."""
        t, c, started = self.cfg.train, self.counters, _clock()
        self.stop.install()
        bar = self._progress_bar()
        try:
            if self.memory_kept:
                note = "CPU memory: freed memory is kept for the next steps (glibc malloc without mmap)"
                self._log({"kind": "event", "step": c.step, "message": note})
            if self.loss_kernel is not None:
                note = f"float32 CPU loss: {self.loss_kernel}; {self.loss_kernel_how}"
                self._log({"kind": "event", "step": c.step, "message": note})
                if bar is not None:
                    self._print(note)
            if self.resumed_from is not None:
                self._log({"kind": "event", "step": c.step, "message": f"resumed from {self.resumed_from}"})
            elif self.cfg.eval.every and t.init_from:
                self._evaluate()  # the pretrained model's val loss: what fine-tuning starts from
            self._deadline = started + 60 * t.max_minutes if t.max_minutes else None
            while c.step < t.max_steps:
                t0 = _clock()
                with deterministic(self.device) if t.deterministic else contextlib.nullcontext():
                    loss, norm, stop, time_up = self._train_step()
                dt = self._last_step_time = _clock() - t0
                c.step += 1
                c.tokens += self.tokens_per_step
                self.schedule.advance()
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    self._nonfinite(loss, norm)
                else:
                    self.last_loss = loss
                record = self._train_record(loss, norm, dt, _clock() - started)
                if c.step % t.log_every == 0 or c.step == t.max_steps:
                    self._log(record)
                if bar is not None:
                    bar.set_postfix_str(progress_text(record), refresh=False)
                    bar.update(1)
                done = c.step == t.max_steps
                # Out of time: this step is the run's last, evaluated and saved as the end of the run is.
                last = done or (time_up and not stop)
                stop = stop or (self.stop_at is not None and c.step >= self.stop_at)
                if last or (self.cfg.eval.every and c.step % self.cfg.eval.every == 0):
                    self._evaluate()
                if last or stop or (self.cfg.checkpoint.every and c.step % self.cfg.checkpoint.every == 0):
                    self._save()
                if last and not done:
                    if self.env.is_main:
                        message = (
                            f"train.max_minutes ({t.max_minutes:g}) reached: stopped after step {c.step} of "
                            f"{t.max_steps}, checkpoint {self.last_ckpt}"
                        )
                        self._log({"kind": "event", "step": c.step, "message": message})
                        self._print(message)
                    break
                if stop and not done:
                    if self.env.is_main:
                        why = (
                            f"{self.stop.signal_name} received" if self.stop.requested else f"--stop-at {self.stop_at}"
                        )
                        self._print(f"{why}: stopped after step {c.step}, checkpoint {self.last_ckpt}")
                    break
        finally:
            self.loader.close()
            self.stop.restore()
            if bar is not None:
                bar.close()
            if self.writer is not None:
                self.writer.close()
        return TrainResult(
            self.run_dir,
            c.step,
            c.tokens,
            self.last_loss,
            self.last_val,
            self.last_ckpt,
            c.step < t.max_steps,
            _clock() - started,
        )

    def _train_step(self) -> tuple[float, float, bool, bool]:
        """One optimizer step; returns (mean loss over all ranks' micro-batches, grad norm, stop?, out of
        time?). Both flags are votes of every rank, all-reduced with the loss, so all ranks agree."""
        self.schedule.apply()
        self.train_model.train()
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            x, y = self.loader.next_batch()  # (B, T) each
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            last = micro == self.grad_accum - 1
            # Gradients are all-reduced (DDP) or reduce-scattered (FSDP) on the last micro-step only
            # (torch DDP docs, no_sync; FSDP2's set_requires_gradient_sync).
            if self.fsdp:
                self.model.set_requires_gradient_sync(last)
            sync = (
                contextlib.nullcontext()
                if last or not isinstance(self.train_model, DDP)
                else self.train_model.no_sync()
            )
            with sync:
                with autocast(self.device, self.amp_dtype):
                    _, loss = self.train_model(x, y)
                loss = loss / self.grad_accum  # the mean over micro-steps, like one big batch
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach().float()
        packed = torch.stack([loss_sum, self._flags[self.stop.requested], self._flags[self._out_of_time()]])
        D.all_reduce_sum(packed)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        self.scaler.unscale_(self.optimizer)  # the true gradients, for the norm and the clipping
        norm_t = clip_gradients(list(self.model.parameters()), clip)  # the global norm, under FSDP too
        # The step's one read from the device: the update is skipped when the loss or the norm is not finite.
        loss_sum_all, stop_votes, time_votes, norm = torch.stack([*packed, norm_t.float()]).tolist()
        loss_mean, stop = loss_sum_all / self.env.world_size, stop_votes > 0
        if math.isfinite(loss_mean) and math.isfinite(norm):
            self.optimizer.step()  # the scaler's step() would do the same, with one more device read
        self.scaler.update()  # halves the scale after an overflow, grows it after a run of clean steps
        self.optimizer.zero_grad(set_to_none=True)
        return loss_mean, norm, stop, time_votes > 0

    def _out_of_time(self) -> bool:
        """Would one more step, as long as the last one, end past train.max_minutes? Asked near the end of
        each step, so a step always runs, even when the limit has already passed."""
        if self._deadline is None:
            return False
        return _clock() + self._last_step_time > self._deadline

    def _nonfinite(self, loss: float, norm: float) -> None:
        c = self.counters
        if math.isfinite(loss) and self.scaler.is_enabled() and self.scaler.get_scale() >= 1.0:
            # float16 gradients overflowed: the scaler lowered its scale, the next step tries again
            # (Micikevicius et al. 2018). Only infinities left at a scale below 1 mean divergence.
            self.last_loss = loss
            scale = self.scaler.get_scale()
            message = f"float16 gradients overflowed at step {c.step}: update skipped, loss scale now {scale:g}"
            self._log({"kind": "event", "step": c.step, "message": message})
            return
        what = f"non-finite loss ({loss})" if not math.isfinite(loss) else f"non-finite gradient norm ({norm})"
        if c.skipped_steps < self.cfg.train.skip_nonfinite:
            c.skipped_steps += 1
            allowed = self.cfg.train.skip_nonfinite
            message = f"{what} at step {c.step}: update skipped ({c.skipped_steps} of {allowed} allowed)"
            self._log({"kind": "event", "step": c.step, "message": message})
            if self.env.is_main:
                self._print(message)
            return
        kept = f"the last good checkpoint is {self.last_ckpt}" if self.last_ckpt else "no checkpoint was written yet"
        raise GPT2LabError(
            f"{what} at step {c.step}: training stopped and {kept}. Resume it with --resume auto, perhaps "
            "with a lower optim.lr, or allow skipping a few bad steps with --skip-nonfinite N"
        )

    def _train_record(self, loss: float, norm: float, dt: float, elapsed: float) -> dict[str, Any]:
        tps = self.tokens_per_step / dt if dt > 0 else 0.0
        return {
            "kind": "train",
            "step": self.counters.step,
            "loss": loss,
            "lr": self.schedule.lr(self.counters.step - 1),
            "grad_norm": norm,
            "tokens": self.counters.tokens,
            "tokens_per_sec": tps,
            "mfu": mfu(self.flops_per_token, tps, self.peak, self.env.world_size),
            "step_time": dt,
            "elapsed": elapsed,
        }

    # ------------------------------------------------------------------------------------- eval and save

    def _evaluate(self) -> None:
        e = self.cfg.eval
        ctx = EvalContext(
            step=self.counters.step,
            rank=self.env.rank,
            world_size=self.env.world_size,
            device=self.device,
            autocast_dtype=self.amp_dtype,
            tokenizer=self.tokenizer,
            seq_len=self.cfg.train.seq_len,
            batch_size=e.batch_size or self.cfg.train.batch_size,
        )
        with gathered_for_eval(self.model):  # a sharded model: whole on every rank meanwhile
            metrics = self.evaluator(self.model, ctx)
            text = None
            if self.env.is_main and e.sample_tokens:
                text = sample_text(self.model, self.tokenizer, e.sample_prompt, e.sample_tokens, self.cfg.train.seed)
        if "val_loss" in metrics:
            self.last_val, self.val_step = metrics["val_loss"], self.counters.step
            self.counters.best_val_loss = min(self.counters.best_val_loss, metrics["val_loss"])
        if not self.env.is_main:
            return
        if metrics:
            self._log({"kind": "eval", "step": self.counters.step, "tokens": self.counters.tokens, **metrics})
            self._print(f"step {self.counters.step}: {describe(metrics)}")
        if text is not None:
            self._log({"kind": "sample", "step": self.counters.step, "prompt": e.sample_prompt, "text": text})
            self._print(f"step {self.counters.step} sample: {e.sample_prompt}{text}")

    def _save(self) -> None:
        """Checkpoint the state after `counters.step` steps (see train/saving.py)."""
        step = self.counters.step
        meta = {
            "step": step,
            "tokens": self.counters.tokens,
            "train_loss": self.last_loss,
            "val_loss": self.last_val if self.val_step == step else None,
            "config": self.cfg.to_dict(),
            "world_size": self.env.world_size,
            "grad_accum": self.grad_accum,
            "parallel": self.cfg.train.parallel,
            "cpu_loss_kernel": self.loss_kernel.to_dict() if self.loss_kernel is not None else None,
        }
        self.last_ckpt = self.checkpoints.save(step, self.components(), meta, self.writer, previous=self.last_ckpt)

    # ------------------------------------------------------------------------------------- output

    def _progress_bar(self):
        if not (self.progress and self.env.is_main):
            return None
        from tqdm.auto import tqdm

        total, done = self.cfg.train.max_steps, self.counters.step
        return tqdm(total=total, initial=done, unit="step", dynamic_ncols=True, desc="train")

    def _log(self, record: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.write(record)

    def _print(self, text: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(text)


def train(
    cfg: TrainConfig,
    resume: str = "never",
    stop_at: int | None = None,
    eval_tasks: Sequence[EvalTask] = (),
    progress: bool = True,
) -> TrainResult:
    """Run `cfg` to the end (see Trainer); the process group, if any, is left for the caller to close."""
    return Trainer(cfg, resume=resume, stop_at=stop_at, eval_tasks=eval_tasks, progress=progress).run()
