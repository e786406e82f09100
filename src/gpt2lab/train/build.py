"""How a run is built: its data (the tokenizer it was prepared with, this rank's batches), its batch
geometry, its model (fresh with GPT-2's initialisation, pretrained weights, or a training checkpoint's
shape), and `TrainerSetup`, the steps that make every part of a Trainer (train/loop.py) before it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import accel, distributed
from ..accel import CpuLossKernel
from ..chat import ChatTemplate, template_of
from ..checkpoint import is_checkpoint, load_model, missing_model_path, read_meta, resolve_checkpoint
from ..config import GPTConfig
from ..data import ShardLoader, data_tokenizer
from ..data.chat_loader import ChatLoader, open_chat_loader
from ..data.prefetch import PrefetchLoader
from ..data.shards import MANIFEST_NAME
from ..errors import GPT2LabError
from ..fileio import atomic_write_text
from ..metrics import MetricsWriter, peak_flops, truncate_metrics
from ..model import GPT
from ..runtime import autocast_dtype, deterministic_cublas, keep_freed_memory, needs_grad_scaler, seed_everything
from ..tokenizer import Tokenizer, get_tokenizer
from .checkpoint import Checkpointer, find_resume, load_training_checkpoint, remove_stale_temporaries
from .config import TrainConfig, to_toml
from .evaluate import EvalTask, Evaluator, sample_prompt, split_if_any
from .optim import Schedule, build_optimizer
from .parallel import check_fsdp_supported, enable_activation_checkpointing, shard_model
from .signals import StopRequest
from .state import Counters, RNGState, model_and_optimizer_states
from .wandb_log import WandbRun


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


def chat_template_for(cfg: TrainConfig, tokenizer: Tokenizer) -> ChatTemplate | None:
    """The chat template whose replies train.loss = "assistant" learns (the data's), or None for
    train.loss = "all"; text data under "assistant" is a GPT2LabError."""
    if cfg.train.loss != "assistant":
        return None
    template = template_of(tokenizer)
    if template is None:
        raise GPT2LabError(
            f"train.loss = 'assistant' learns the assistant's replies of chat data, but {cfg.data.dir} was not "
            "prepared from conversations: prepare it from records with a 'messages' field, or use train.loss = 'all'"
        )
    return template


def train_loader(
    cfg: TrainConfig,
    tokenizer: Tokenizer,
    rank: int,
    world_size: int,
    device: torch.device,
    chat: ChatTemplate | None = None,
) -> PrefetchLoader:
    """This rank's training batches, (batch_size, seq_len) windows of the train split, or with a chat
    template, rows of conversations whose targets are -1 outside the assistant's replies (ChatLoader)."""
    t = cfg.train
    where = dict(rank=rank, world_size=world_size, seed=t.seed, shuffle=cfg.data.shuffle, tokenizer=tokenizer)
    if chat is not None:
        rows = open_chat_loader(
            cfg.data.dir, "train", bos_id=chat.bos_id, batch_size=t.batch_size, seq_len=t.seq_len, **where
        )
        # A thread cuts the next batches while the device computes; pinned, they copy without blocking.
        return PrefetchLoader(rows, pin_memory=device.type == "cuda")  # type: ignore[arg-type]
    windows = ShardLoader(cfg.data.dir, "train", batch_size=t.batch_size, seq_len=t.seq_len, **where)
    return PrefetchLoader(windows, pin_memory=device.type == "cuda")


def chat_val_rows(cfg: TrainConfig, tokenizer: Tokenizer, chat: ChatTemplate | None) -> ChatLoader | None:
    """The val split's rows as the chat loss evaluates them (unshuffled), or None for text training
    or without a val loss."""
    if chat is None or cfg.eval.val_tokens == 0:
        return None
    return open_chat_loader(
        cfg.data.dir, "val", tokenizer=tokenizer, bos_id=chat.bos_id, batch_size=1, seq_len=cfg.train.seq_len
    )


def precision_text(amp_dtype: torch.dtype | None) -> str:
    """How the steps compute, in words: "float32", "bfloat16 autocast (float32 weights)", ..."""
    if amp_dtype is None:
        return "float32"
    scaling = ", loss scaling" if needs_grad_scaler(amp_dtype) else ""
    return f"{str(amp_dtype).removeprefix('torch.')} autocast{scaling} (float32 weights)"


def starting_model(
    cfg: TrainConfig, tokenizer: Tokenizer, device: torch.device, resumed_from: Path | None, meta: dict[str, Any]
) -> GPT:
    """The run's model on `device`: the shape of the training checkpoint `resumed_from` (gpt2lab.json
    `meta`; its weights are restored later), else train.init_from's weights, else a fresh one. It must
    read the data's `tokenizer` and fit train.seq_len."""
    t = cfg.train
    if resumed_from is not None:
        check_same_tokenizer(meta.get("tokenizer"), tokenizer, f"checkpoint {resumed_from}")
        model = empty_model(GPTConfig.from_dict(meta["model"]), device)
    elif t.init_from:
        model = pretrained_model(cfg, tokenizer)
    else:
        model = fresh_model(cfg, tokenizer.n_vocab)
    if model.config.vocab_size != tokenizer.n_vocab:
        raise GPT2LabError(
            f"the model has a vocabulary of {model.config.vocab_size} tokens but {cfg.data.dir} was tokenized "
            f"with {tokenizer.name!r} ({tokenizer.n_vocab} tokens); prepare the data with the model's tokenizer"
        )
    if t.seq_len > model.config.block_size:
        raise GPT2LabError(
            f"train.seq_len ({t.seq_len}) is longer than the model's context ({model.config.block_size})"
        )
    return model.to(device)


def fresh_model(cfg: TrainConfig, vocab_size: int) -> GPT:
    """A randomly initialised GPT of the run's [model] shape (draws from torch's global RNG)."""
    return GPT(cfg.model_config(vocab_size=vocab_size))


def pretrained_model(cfg: TrainConfig, tokenizer: Tokenizer) -> GPT:
    """The weights of `train.init_from` (Hub name, HF directory, gpt2lab checkpoint or run directory),
    with the run's dropout and vocabulary padding; the shape is the source's. The data's `tokenizer`
    must be the one the weights were trained with."""
    source = cfg.train.init_from
    explicit = [k for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(cfg.model, k) is not None]
    if explicit:
        raise GPT2LabError(
            f"model.{explicit[0]} cannot be set together with train.init_from: the shape comes from {source}"
        )
    missing = missing_model_path(source)
    if missing:
        raise GPT2LabError(f"train.init_from: {missing}")
    if Path(source).expanduser().is_dir() and resolve_checkpoint(Path(source).expanduser()) is not None:
        source = str(resolve_checkpoint(Path(source).expanduser()))
    loaded = load_model(source)
    folder = Path(source) if is_checkpoint(Path(source)) else None
    # Hugging Face GPT-2 weights go with GPT-2's tokenizer; a gpt2lab checkpoint records its own.
    record = read_meta(folder).get("tokenizer") if folder is not None else get_tokenizer().info()
    check_same_tokenizer(record, tokenizer, str(source))
    config = loaded.config.replace(dropout=cfg.model.dropout, pad_vocab_multiple=cfg.model.pad_vocab_multiple)
    template = template_of(tokenizer)
    if template is not None and loaded.config.vocab_size == template.first_id:
        # A text model fine-tuned on conversations: the chat tokens get rows (with_shape initialises them).
        config = config.replace(vocab_size=template.n_vocab)
    elif loaded.config.vocab_size != tokenizer.n_vocab:
        raise GPT2LabError(
            f"{source} has a vocabulary of {loaded.config.vocab_size} tokens but the data was tokenized with "
            f"{tokenizer.n_vocab}; fine-tune on data prepared with the model's tokenizer"
        )
    return with_shape(loaded, config)


def check_same_tokenizer(record: dict | None, tokenizer: Tokenizer, what: str) -> None:
    """Refuse to train weights made with one tokenizer on data made with another (same size or not)."""
    record = record or {"name": "gpt2", "vocab_hash": get_tokenizer().vocab_hash}
    if record.get("vocab_hash") not in (None, tokenizer.vocab_hash):
        raise GPT2LabError(
            f"{what} was trained with tokenizer {record.get('name')!r} but the data was tokenized with "
            f"{tokenizer.name!r}; prepare the data with the model's tokenizer (gpt2lab prepare --tokenizer DIR)"
        )


def with_shape(model: GPT, config: GPTConfig) -> GPT:
    """`model`'s weights under `config`, which may differ in dropout, vocabulary padding and a larger
    vocabulary: new tokens' rows (taking spare padding rows or added ones alike) start at the mean of
    the existing tokens' embeddings, as transformers' `resize_token_embeddings` does, so they begin
    as an average token instead of noise; new padding rows are zero (they never reach a softmax),
    dropped padding rows were unused."""
    weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    wte = weights["transformer.wte.weight"][: model.config.vocab_size]  # (V, C), the tokens' rows
    added = config.vocab_size - wte.size(0)
    if added > 0:
        wte = torch.cat([wte, wte.mean(dim=0, keepdim=True).expand(added, -1)])  # (V + added, C)
    wte = wte[: config.vocab_size]
    pad = config.padded_vocab_size - config.vocab_size
    weights["transformer.wte.weight"] = torch.cat([wte, wte.new_zeros(pad, wte.size(1))])  # (padded V, C)
    return GPT.from_state_dict(config, weights).train()


def empty_model(config: GPTConfig, device: torch.device | str) -> GPT:
    """A GPT of `config` on `device` with its weights left uninitialised, for a training checkpoint's
    weights to be copied into (train.checkpoint.ModelState.load_state_dict): no time goes to a random init that
    would be overwritten, and no random numbers are drawn."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.lm_head.weight = model.transformer.wte.weight  # to_empty makes a tensor per module: tie again
    return model.train()


class TrainerSetup:
    """The set-up half of `Trainer` (train/loop.py), which runs these steps in its constructor:
    `_build` makes every part of the run (device, data, model, optimizer, schedule, counters,
    checkpointer, evaluator), `_wrap` puts torch.compile and DDP around the model, `_restore` loads a
    checkpoint's state into the components (or starts afresh), and `_open_outputs` readies the run
    directory. Every attribute the loop reads is made here.
    """

    cfg: TrainConfig

    def _build(self, resume: str, eval_tasks: Sequence[EvalTask]) -> None:
        """The run's components, unwrapped; a resumed run's model has its shape, not yet its weights."""
        cfg, t = self.cfg, self.cfg.train
        self._setup_device()
        self.run_dir = Path(t.out_dir)
        self.grad_accum = gradient_accumulation(cfg, self.env.world_size)
        self.tokens_per_step = t.total_batch_tokens
        self.tokenizer = data_tokenizer_or_gpt2(cfg.data.dir)
        self.chat = chat_template_for(cfg, self.tokenizer)
        self.loader = train_loader(cfg, self.tokenizer, self.env.rank, self.env.world_size, self.device, self.chat)
        # The stop flag goes into the loss all-reduce as one of these device scalars: a tensor made
        # from a Python bool every step would be a blocking host-to-device copy.
        self._flags = (torch.zeros((), device=self.device), torch.ones((), device=self.device))
        self._build_model(resume)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        # float16 gradients underflow without loss scaling; for bf16 and float32 the scaler does nothing.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=needs_grad_scaler(self.amp_dtype))
        self.schedule = Schedule(self.optimizer, cfg.optim, t.max_steps)
        self.counters = Counters()
        states = {
            **model_and_optimizer_states(self.model, self.optimizer, sharded=self.fsdp),
            "grad_scaler": self.scaler,
            "schedule": self.schedule,
            "counters": self.counters,
            "loader": self.loader,
            "rng": RNGState(),
        }
        self.checkpointer = Checkpointer(self.run_dir, self.env, self.tokenizer, cfg.checkpoint, states)
        self.evaluator = Evaluator(
            cfg.data.dir,
            self.tokenizer,
            cfg.eval.val_tokens,
            cfg.eval.tasks,
            eval_tasks,
            self.env.rank,
            self.env.world_size,
            chat_val=chat_val_rows(cfg, self.tokenizer, self.chat),
        )
        self.val_split = self.evaluator.val_data
        if self.val_split is None:
            self.val_split = split_if_any(cfg.data.dir, "val", self.tokenizer)
        train_tokens = self.loader.loader.tokens
        self.sample_prompt = sample_prompt(
            cfg.eval.sample_prompt, self.val_split, train_tokens, self.tokenizer, self.chat
        )
        self.stop = StopRequest()
        self._deadline: float | None = None  # train.max_minutes after run() started (perf_counter)
        self._last_step_time = 0.0
        self.last_loss: float | None = None
        self.last_val: float | None = None
        self.val_step = -1  # the step last_val was measured at

    def _setup_device(self) -> None:
        """This rank's place and device, and how it computes: autocast, TF32, FSDP, CPU memory."""
        t = self.cfg.train
        cublas_in_time = deterministic_cublas() if t.deterministic else True  # before CUDA starts
        self.env = distributed.setup(t.device)
        self.device = self.env.device
        if not cublas_in_time and self.device.type == "cuda":
            raise GPT2LabError(
                "train.deterministic: CUDA was already started in this process without CUBLAS_WORKSPACE_CONFIG; "
                "set CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment before starting Python"
            )
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

    def _build_model(self, resume: str) -> None:
        """The model, from the checkpoint `--resume` picks (its shape; `_restore` copies in its weights),
        train.init_from's weights or a fresh start, ready to be trained on this device."""
        t = self.cfg.train
        self.resumed_from = find_resume(self.run_dir, resume, self.env)
        self._saved: dict[str, Any] | None = None
        seed_everything(t.seed)  # the same initial weights on every rank
        meta: dict[str, Any] = {}
        if self.resumed_from is not None:
            meta, self._saved = load_training_checkpoint(self.resumed_from)
        self.model = starting_model(self.cfg, self.tokenizer, self.device, self.resumed_from, meta)
        self.num_params = self.model.num_params()  # counted whole, before FSDP shards the model
        self.loss_kernel, self.loss_kernel_how = self._loss_kernel(meta.get("training", {}).get("cpu_loss_kernel"))
        accel.use_fused_loss(self.model, self.loss_kernel)  # a no-op where GPT2LAB_ACCEL=0
        self.flops_per_token = self.model.estimate_flops_per_token(t.seq_len)
        self.peak = peak_flops(self.device, self.amp_dtype)
        if t.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        if self.fsdp:  # in place, before the optimizer: AdamW is built over the sharded parameters
            shard_model(self.model, self.device, self.amp_dtype)

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
        kernel_dict, how = distributed.broadcast_from_main(chosen, self.env)
        return CpuLossKernel.from_dict(kernel_dict), how

    def _wrap(self) -> None:
        """`train_model`: the model as the steps call it, compiled and/or under DDP; `self.model`
        stays the plain GPT (evaluation, sampling and checkpoints use it). Under FSDP `self.model` is
        already sharded in place (in `_build_model`); FSDP2's hooks are closed to Dynamo, so the root's
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
        """Every component from the checkpoint `_build_model` found, or a fresh start's RNG."""
        saved, self._saved = self._saved, None  # the weights are copied into the model: no second copy is kept
        self.last_ckpt = self.resumed_from
        if saved is not None:
            assert self.resumed_from is not None
            self.checkpointer.restore(saved, self.resumed_from, self.cfg.train.seed)
        elif self.env.world_size > 1:  # dropout masks differ between ranks, as between micro-steps
            torch.manual_seed(self.cfg.train.seed + self.env.rank)

    def _header(self) -> list[str]:
        """What the run is about to do, in a few lines for rank 0 to print before its first step: the
        model, the device and precision, the data, the steps and their tokens, evaluation, the run directory."""
        cfg, t, ev, mc = self.cfg, self.cfg.train, self.cfg.eval, self.model.config
        start = "initialised afresh" if not t.init_from else f"weights of {t.init_from}"
        if self.resumed_from is not None:
            start = "from the checkpoint"
        device, threads = str(self.device), torch.get_num_threads()
        if self.device.type == "cpu":
            device += f", {threads} thread{'s' if threads > 1 else ''}"
        if self.env.world_size > 1:
            device += f" x {self.env.world_size} ranks ({t.parallel})"
        compiled = ", torch.compile" if t.compile else ""
        train_tokens = len(self.loader.loader.tokens)
        val_tokens = len(self.val_split) if self.val_split is not None else 0
        total = t.max_steps * self.tokens_per_step
        evals = f"every {ev.every:,} steps and at the end" if ev.every else "at the end"
        what = [f"val loss on up to {min(ev.val_tokens, val_tokens):,} val tokens"] if ev.val_tokens else []
        what += list(ev.tasks)
        if ev.sample_tokens:
            prompt = repr(self.sample_prompt) if self.sample_prompt else "a new document"
            reply = "reply to the user's message " if self.chat is not None else "sample from "
            what.append(f"a {ev.sample_tokens}-token {reply}{prompt}")
        return [
            f"model: {mc.n_layer} layers, {mc.n_head} heads, {mc.n_embd} wide, context {mc.block_size}: "
            f"{self.num_params:,} parameters ({start})",
            f"device: {device}, {precision_text(self.amp_dtype)}{compiled}",
            f"data: {train_tokens:,} train and {val_tokens:,} val tokens in {cfg.data.dir}, tokenizer "
            f"{self.tokenizer.name} ({self.tokenizer.n_vocab:,} tokens)"
            + ("; the loss learns the assistant's replies only" if self.chat is not None else ""),
            f"steps: {t.max_steps:,} x {self.tokens_per_step:,} tokens = {total:,} tokens "
            f"({total / train_tokens:.3g} passes over the train tokens); micro-batches of {t.batch_size} x "
            f"{t.seq_len}, gradient accumulation {self.grad_accum}",
            f"eval: {evals}: {', '.join(what)}" if what else "eval: none",
            f"run directory: {self.run_dir}",
        ]

    def _wandb_run(self) -> WandbRun | None:
        """The wandb run that rank 0's records also go to, or None without train.wandb_project: a resumed
        run logs into the wandb run it logged into before (RUN/wandb.json), with its samples so far."""
        t = self.cfg.train
        if not t.wandb_project:
            return None
        derived = {"num_params": self.num_params, "world_size": self.env.world_size, "grad_accum": self.grad_accum}
        return WandbRun(
            self.run_dir,
            t.wandb_project,
            {**self.cfg.to_dict(), "run": derived},
            entity=t.wandb_entity,
            name=t.wandb_run_name,
            resume=self.resumed_from is not None,
        )

    def _open_outputs(self) -> None:
        """Rank 0's metrics.jsonl (cut back to the step the run continues from), config.toml, and a
        checkpoints/ without the leftovers of a killed run; with train.wandb_project, its wandb run too."""
        self.writer = None
        if self.env.is_main:
            truncate_metrics(self.run_dir, self.counters.step)  # nothing past the checkpoint we continue from
            self.writer = MetricsWriter(self.run_dir, self.cfg.train.tensorboard, self._wandb_run())
            atomic_write_text(self.run_dir / "config.toml", to_toml(self.cfg))
            remove_stale_temporaries(self.run_dir)
