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
state after N steps, as a dict of components (train/checkpoint.py): weights, AdamW state, loss scaler,
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import distributed
from ..errors import GPT2LabError
from ..metrics import mfu, progress_text
from ..runtime import autocast, deterministic
from .build import TrainerSetup
from .config import TrainConfig
from .evaluate import EvalContext, EvalTask, describe, sample_text
from .parallel import clip_gradients, gathered_for_eval

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


class Trainer(TrainerSetup):
    """One training run; `Trainer(cfg).run()` or the `train(cfg)` shortcut.

    The constructor sets the run up (TrainerSetup, train/build.py: `_build` makes every component,
    `_wrap` puts torch.compile and DDP around the model, `_restore` loads a checkpoint's state into the
    components or starts afresh, `_open_outputs` readies the run directory); `run` trains.
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

    # ------------------------------------------------------------------------------------- the loop

    def run(self) -> TrainResult:
        """Train to max_steps (or a stop request); returns how it ended. Non-finite losses and failed
        checkpoint writes raise GPT2LabError, leaving the last good checkpoint as it was."""
        t, c, started = self.cfg.train, self.counters, _clock()
        self.stop.install()
        bar = None
        try:
            self._announce()
            bar = self._progress_bar()
            if self.resumed_from is None and self.cfg.eval.every and t.init_from:
                self._evaluate()  # the pretrained model's val loss: what fine-tuning starts from
            self._start_clock(started)
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
                if (last or stop) and not done:
                    self._report_early_end(out_of_time=last)
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

    def _announce(self) -> None:
        """Rank 0's opening lines, printed and logged as events: the header (TrainerSetup._header), the
        step a resumed run continues from, and how a CPU computes (its loss kernel printed beside a bar)."""
        if not self.env.is_main:
            return
        c, t = self.counters, self.cfg.train
        lines = self._header()
        if self.resumed_from is not None:
            lines.append(f"resuming from step {c.step} of {t.max_steps} (checkpoint {self.resumed_from})")
        for line in lines:
            self._log({"kind": "event", "step": c.step, "message": line})
            self._print(line)
        if self.memory_kept:
            note = "CPU memory: freed memory is kept for the next steps (glibc malloc without mmap)"
            self._log({"kind": "event", "step": c.step, "message": note})
        if self.loss_kernel is not None:
            note = f"float32 CPU loss: {self.loss_kernel}; {self.loss_kernel_how}"
            self._log({"kind": "event", "step": c.step, "message": note})
            if self.progress:
                self._print(note)

    def _report_early_end(self, out_of_time: bool) -> None:
        """Rank 0's word on a run that ends before max_steps: out of time, or asked to stop."""
        if not self.env.is_main:
            return
        c, t = self.counters, self.cfg.train
        if out_of_time:
            message = (
                f"train.max_minutes ({t.max_minutes:g}) reached: stopped after step {c.step} of "
                f"{t.max_steps}, checkpoint {self.last_ckpt}"
            )
            self._log({"kind": "event", "step": c.step, "message": message})
            self._print(message)
        else:
            why = f"{self.stop.signal_name} received" if self.stop.requested else f"--stop-at {self.stop_at}"
            self._print(f"{why}: stopped after step {c.step}, checkpoint {self.last_ckpt}")

    def _train_step(self) -> tuple[float, float, bool, bool]:
        """One optimizer step; returns (mean loss over all ranks' micro-batches, grad norm, stop?, out of
        time?). Both flags are votes of every rank, all-reduced with the loss, so all ranks agree."""
        self.schedule.apply()
        self.train_model.train()
        loss_sum = torch.zeros((), device=self.device)
        if self.chat is not None:
            for micro, (x, y, weigh) in enumerate(self._chat_micro_batches()):
                loss_sum += self._micro_step(x, y, micro == self.grad_accum - 1, weigh)
        else:
            for micro in range(self.grad_accum):
                x, y = self.loader.next_batch()  # (B, T) each
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                # The mean over micro-steps, like one big batch.
                loss_sum += self._micro_step(x, y, micro == self.grad_accum - 1, lambda loss: loss / self.grad_accum)
        totals = torch.stack([loss_sum, self._flags[self.stop.requested], self._flags[self._out_of_time()]])
        distributed.all_reduce_sum(totals)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        self.scaler.unscale_(self.optimizer)  # the true gradients, for the norm and the clipping
        norm_t = clip_gradients(list(self.model.parameters()), clip)  # the global norm, under FSDP too
        # The step's one read from the device: the update is skipped when the loss or the norm is not finite.
        loss_sum_all, stop_votes, time_votes, norm = torch.stack([*totals, norm_t.float()]).tolist()
        loss_mean, stop = loss_sum_all / self.env.world_size, stop_votes > 0
        if math.isfinite(loss_mean) and math.isfinite(norm):
            self.optimizer.step()  # the scaler's step() would do the same, with one more device read
        self.scaler.update()  # halves the scale after an overflow, grows it after a run of clean steps
        self.optimizer.zero_grad(set_to_none=True)
        return loss_mean, norm, stop, time_votes > 0

    def _micro_step(
        self, x: torch.Tensor, y: torch.Tensor, last: bool, weigh: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Forward and backward of one micro-batch, x and y (B, T) on the device; `weigh` turns the
        model's loss (the mean over the batch's targets) into this micro-batch's share of the step's.
        Returns that share, detached, float32."""
        # Gradients are all-reduced (DDP) or reduce-scattered (FSDP) on the last micro-step only
        # (torch DDP docs, no_sync; FSDP2's set_requires_gradient_sync).
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
        sync = contextlib.nullcontext() if last or not isinstance(self.train_model, DDP) else self.train_model.no_sync()
        with sync:
            with autocast(self.device, self.amp_dtype):
                _, loss = self.train_model(x, y)
            loss = weigh(loss)
            self.scaler.scale(loss).backward()
        return loss.detach().float()

    def _chat_micro_batches(self) -> list[tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]:
        """The step's micro-batches under the chat loss, each (x, y, weigh): the step's loss is the mean
        over every learned target of the step, on all ranks and micro-batches, as one big batch's.

        Micro-batches hold different numbers of learned targets n_i, so each one's mean loss is weighted
        by n_i * W / N (N: the step's learned targets over all W ranks, one all-reduce of a device
        scalar; DDP and FSDP average gradients over ranks, hence the W). A micro-batch without targets
        adds nothing (its mean, 0 / 0, is replaced by 0)."""
        batches = []
        for _ in range(self.grad_accum):
            x, y = self.loader.next_batch()  # (B, T) each
            batches.append((x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)))
        counts = torch.stack([(y != -1).sum() for _, y in batches]).float()  # (grad_accum,) learned targets
        total = distributed.all_reduce_sum(counts.sum()).clamp(min=1)
        weights = counts * self.env.world_size / total  # (grad_accum,)

        def weigh_by(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda loss: torch.where(counts[i] > 0, loss, 0.0) * weights[i]

        return [(x, y, weigh_by(i)) for i, (x, y) in enumerate(batches)]

    def _start_clock(self, started: float) -> None:
        """train.max_minutes from `started`; with optim.fit_schedule_to_time the schedule keeps pace with
        the time gone, every rank with rank 0's clock so that all take the same rates."""
        limit = 60 * self.cfg.train.max_minutes
        self._deadline = started + limit if limit else None
        if limit and self.cfg.optim.fit_schedule_to_time:
            self.schedule.follow_clock(lambda: distributed.broadcast_from_main((_clock() - started) / limit, self.env))

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
            "lr": self.schedule.last_lr,
            "grad_norm": norm,
            "tokens": self.counters.tokens,
            "tokens_per_sec": tps,
            "mfu": mfu(self.flops_per_token, tps, self.peak, self.env.world_size),
            "step_time": dt,
            "elapsed": elapsed,
        }

    # ------------------------------------------------------------------------------------- eval and save

    def _evaluate(self) -> None:
        ev = self.cfg.eval
        ctx = EvalContext(
            step=self.counters.step,
            rank=self.env.rank,
            world_size=self.env.world_size,
            device=self.device,
            autocast_dtype=self.amp_dtype,
            tokenizer=self.tokenizer,
            seq_len=self.cfg.train.seq_len,
            batch_size=ev.batch_size or self.cfg.train.batch_size,
        )
        with gathered_for_eval(self.model):  # a sharded model: whole on every rank meanwhile
            metrics = self.evaluator(self.model, ctx)
            text = None
            if self.env.is_main and ev.sample_tokens:
                seed = self.cfg.train.seed
                text = sample_text(self.model, self.tokenizer, self.sample_prompt, ev.sample_tokens, seed, self.chat)
        if "val_loss" in metrics:
            self.last_val, self.val_step = metrics["val_loss"], self.counters.step
            self.counters.best_val_loss = min(self.counters.best_val_loss, metrics["val_loss"])
        if not self.env.is_main:
            return
        if metrics:
            self._log({"kind": "eval", "step": self.counters.step, "tokens": self.counters.tokens, **metrics})
            self._print(f"step {self.counters.step}: {describe(metrics)}")
        if text is not None:
            self._log({"kind": "sample", "step": self.counters.step, "prompt": self.sample_prompt, "text": text})
            shown = f"reply to {self.sample_prompt!r}: {text}" if self.chat is not None else self.sample_prompt + text
            self._print(f"step {self.counters.step} sample: {shown}")

    def _save(self) -> None:
        """Checkpoint the state after `counters.step` steps (see train/checkpoint.py)."""
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
        self.last_ckpt = self.checkpointer.save(step, meta, self.writer, previous=self.last_ckpt)

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
