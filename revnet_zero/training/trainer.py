"""One trainer for language models that return ``.loss`` (reversible or not).

AdamW, linear warm-up then cosine decay, gradient accumulation and clipping, bf16 autocast or fp16
with dynamic loss scaling, periodic evaluation, a progress bar, a JSONL metrics file, and checkpoints
from which a run resumes bit for bit (weights, optimizer, grad scaler, RNG and data position).

Distributed hooks: ``rank``/``world_size`` shard the batches, ``_wrap`` wraps the model (DDP, FSDP),
``_sync`` skips gradient all-reduce on all but the last micro-batch, only rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..data.packing import Batches
from .checkpoint import last_good_checkpoint, model_metadata, read_checkpoint, save_checkpoint

PRECISIONS = ("fp32", "bf16", "fp16")
ON_NONFINITE = ("raise", "skip")
FIXED_BY_OPTIMIZER = {"betas", "eps", "weight_decay", "memory_efficient_optimizer"}
STATE_KEYS = ("step", "optimizer", "scaler", "rng", "data")  # what a trainer.pt must hold


@dataclass
class TrainingConfig:
    """Options of ``Trainer``; every float finite and in range (checked here, not at the first step).

    Example::

        config = TrainingConfig(lr=1e-3, batch_size=16, on_nonfinite="skip")
        trainer = Trainer(model, config, out_dir="run")    # keywords override the config's fields
    """

    lr: float = 3e-4                          # peak learning rate of AdamW
    weight_decay: float = 0.1                 # on weight matrices and embeddings only (dim >= 2)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas, each in [0, 1)
    eps: float = 1e-8                         # AdamW epsilon (added to the root of the second moment)
    warmup_steps: int | None = None           # linear warm-up; None: 5% of the run's steps
    min_lr_ratio: float = 0.1                 # cosine decay ends at lr * min_lr_ratio on the last step
    batch_size: int = 8                       # sequences per micro-batch when train() gets a dataset
    gradient_accumulation_steps: int = 1      # micro-batches per optimizer step
    gradient_clip: float | None = 1.0         # max global gradient norm; None: no clipping
    precision: str = "fp32"                   # 'fp32', 'bf16' (autocast) or 'fp16' (autocast + loss scaling)
    max_length: int | None = None             # longest sequence accepted; None: the model's max_seq_len
    memory_efficient_optimizer: bool = False  # AdamW's per-tensor loop (foreach=False): slower step,
                                              # temporaries of one tensor at a time instead of all
    eval_every: int | None = None             # steps between evaluations (needs eval data)
    eval_batches: int | None = 20             # batches per evaluation; None: all
    log_every: int = 10                       # steps between metrics lines
    save_every: int | None = None             # steps between checkpoints; one is always written at the end
    keep_checkpoints: int = 2                 # complete checkpoints kept on disk
    out_dir: str | None = None                # checkpoints/ and metrics.jsonl go here; None: nothing written
    seed: int = 0                             # order of the training batches
    progress: bool = True                     # tqdm progress bar
    log_memory_usage: bool = True             # peak memory in the metrics and progress bar
    device: str | None = None                 # None: cuda if available, else cpu
    on_nonfinite: str = "raise"               # a step with NaN/Inf loss or gradients is never applied;
                                              # 'raise': stop, naming the parameters; 'skip': drop the step
                                              # and go on (counted in the metrics). fp16 loss scaling
                                              # skips overflowing steps, as GradScaler does, and 'raise'
                                              # stops once they overflow with the scale below 1

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {self.on_nonfinite!r}")
        self._check_numbers()
        for name in ("batch_size", "gradient_accumulation_steps", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "eval_batches", "max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.save_every is not None and self.out_dir is None:
            raise ValueError(f"save_every={self.save_every} needs out_dir (where the checkpoints go)")

    def _check_numbers(self) -> None:
        """Every float hyperparameter finite and in range: a NaN lr or clip would write NaN weights
        at the first step."""
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {self.betas!r}")
        checks = [("lr", self.lr, 0, False), ("eps", self.eps, 0, False),
                  ("weight_decay", self.weight_decay, 0, True), ("min_lr_ratio", self.min_lr_ratio, 0, True),
                  ("betas[0]", self.betas[0], 0, True), ("betas[1]", self.betas[1], 0, True)]
        if self.gradient_clip is not None:
            checks.append(("gradient_clip", self.gradient_clip, 0, False))
        for name, v, low, closed in checks:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            if v < low or (v == low and not closed):
                raise ValueError(f"{name} must be {'>=' if closed else '>'} {low}, got {v!r}")
        if self.min_lr_ratio > 1 or max(self.betas) >= 1:
            raise ValueError(f"need min_lr_ratio <= 1 and betas < 1, got min_lr_ratio={self.min_lr_ratio}, "
                             f"betas={tuple(self.betas)}")


def resolve_device(name: str | None) -> torch.device:
    """``name`` as a torch.device (None: cuda if available, else cpu). ValueError for a name torch does
    not know, or a device this machine lacks (``'cuda'`` without CUDA, ``'cuda:3'`` with 2 GPUs)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}; expected e.g. 'cpu', 'cuda' or 'cuda:1'") from None
    backend = getattr(torch, dev.type, None)
    if dev.type != "cpu" and callable(getattr(backend, "is_available", None)) and not backend.is_available():
        raise ValueError(f"device {name!r}: no {dev.type} device is available on this machine "
                         f"(torch {torch.__version__}); use --device cpu / device='cpu'")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and callable(count) and dev.index >= count():
        raise ValueError(f"device {name!r}: this machine has {count()} {dev.type} device(s)")
    return dev


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at 0-based ``step``: linear warm-up, then cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _split_batch(batch) -> tuple[Tensor, Tensor]:
    """(input_ids, labels) of a batch: a LongTensor [B, S], or a dict with input_ids (and labels)."""
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise ValueError(f"a batch dict needs 'input_ids', got keys {sorted(batch)}")
        ids = batch["input_ids"]
        return ids, batch.get("labels", ids)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Tensor):
        return batch, batch
    raise TypeError(f"a batch must be a tensor [B, S], an (input_ids, labels) pair or a dict, "
                    f"got {type(batch).__name__}")


def _peak_memory(device: torch.device) -> tuple[str, int]:
    if device.type == "cuda":
        return "cuda_max_allocated", torch.cuda.max_memory_allocated(device)
    import resource  # POSIX only; the CPU figure is the process's peak resident set
    return "cpu_max_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _progress_bar(total: int, initial: int):
    try:
        from tqdm.auto import tqdm
    except ImportError as e:
        raise ImportError("the progress bar needs tqdm: pip install tqdm (or pass progress=False)") from e
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


class Trainer:
    """Trains ``model`` (``model(input_ids, labels=...)`` returns an object with a scalar ``.loss``).

    ``config`` is a TrainingConfig; keyword arguments override its fields. Data: ``train()`` takes a
    map-style dataset of LongTensor [S] items (batched here, in a seeded resumable order) or any
    iterable of batches ``train_loader`` ([B, S] tensors or dicts with ``input_ids``/``labels``).

    Example::

        model = ReversibleGPT(TransformerConfig.preset("tiny"))
        trainer = Trainer(model, lr=1e-3, out_dir="run", eval_every=100)
        trainer.train(train_dataset=train, eval_dataset=val, num_steps=1000, batch_size=16)
        trainer.train(train_dataset=train, num_steps=2000, resume=True)   # later: go on from run/
    """

    rank, world_size = 0, 1  # a distributed subclass sets these before __init__ runs

    def __init__(self, model: nn.Module, config: TrainingConfig | None = None, **overrides):
        self.config = replace(config or TrainingConfig(), **overrides)
        self.device = resolve_device(self.config.device)
        self.module = model.to(self.device)   # the plain model: saved, evaluated, sampled from
        self.model = self._wrap(self.module)  # what the training step calls (DDP/FSDP wrap it)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.config.precision == "fp16")
        self.step = 0
        self._data_pos = {"epoch": 0, "batch": 0}   # position in a train_loader without state_dict()
        self._train_data = None
        self._data_state = None                     # a loaded data position, applied by train()
        self.history: list[dict] = []               # every metrics line of this process
        self.skipped_steps = 0                      # steps not applied (non-finite; fp16 overflow)

    # ------------------------------------------------------------ hooks for distributed subclasses

    def _wrap(self, model: nn.Module) -> nn.Module:
        return model

    def _sync(self, last_micro_batch: bool):
        return contextlib.nullcontext()

    def _forward_context(self):
        """Around each micro-batch's forward and backward (FSDP2: its module hooks are harmless)."""
        return contextlib.nullcontext()

    def _mean_over_ranks(self, value: float) -> float:
        return value

    def _barrier(self) -> None:
        """Wait for every rank (after rank 0 has written a checkpoint)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------ setup

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        params = [p for p in self.module.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": c.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        foreach = False if c.memory_efficient_optimizer else None
        return torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps, foreach=foreach)

    @property
    def data_parallel(self) -> tuple[int, int]:
        """(index, count) of this process's shard of each global batch."""
        return self.rank, self.world_size

    def _batches(self, dataset, shuffle: bool, drop_last: bool) -> Batches:
        rank, world = self.data_parallel
        return Batches(dataset, self.config.batch_size, shuffle=shuffle, seed=self.config.seed,
                       drop_last=drop_last, rank=rank, world_size=world)

    def _max_length(self) -> int | None:
        if self.config.max_length is not None:
            return self.config.max_length
        return getattr(getattr(self.module, "config", None), "max_seq_len", None)

    def _check_data(self, dataset) -> None:
        seq_len, limit = getattr(dataset, "seq_len", None), self._max_length()
        if seq_len is not None and limit is not None and seq_len > limit:
            raise ValueError(f"the dataset's sequences have {seq_len} tokens, more than max_length={limit}")

    def _total_steps(self, data, num_epochs, num_steps) -> int:
        if (num_epochs is None) == (num_steps is None):
            raise ValueError(f"pass exactly one of num_epochs and num_steps, got num_epochs={num_epochs}, "
                             f"num_steps={num_steps}")
        if num_steps is not None:
            return num_steps
        if not hasattr(data, "__len__"):
            raise ValueError("num_epochs needs data with len(); this train loader has none: pass num_steps")
        return num_epochs * len(data) // self.config.gradient_accumulation_steps

    # ------------------------------------------------------------ the loop

    def train(self, train_dataset=None, eval_dataset=None, num_epochs: int | None = None, *,
              train_loader=None, train_dataloader=None, eval_loader=None, num_steps: int | None = None,
              resume=None, time_limit_s: float | None = None, **overrides) -> dict:
        """Train until ``num_steps`` optimizer steps (counting those of a resumed run) or ``num_epochs``
        passes over the data, or ``time_limit_s`` seconds. Keyword arguments that name TrainingConfig
        fields (``batch_size``, ``gradient_clip``, ...) override it. ``resume``: True (the latest
        checkpoint in out_dir) or a checkpoint path. Returns a summary dict.

        ``eval_dataset`` is batched like ``train_dataset`` (map-style, items [S]); ``eval_loader`` is an
        iterable of batches like ``train_loader``. The final checkpoint is written before the final
        evaluation, so a failing evaluation loses no training.

        A step whose loss or gradients are not finite is never applied. With ``on_nonfinite='raise'``
        (the default) a FloatingPointError names the step, the parameters whose gradients are not
        finite and the newest checkpoint that verifies as finite; the weights are left as they were
        before that step. With ``'skip'`` (and always for fp16 overflow) the step is dropped and counted.
        """
        if train_dataloader is not None:
            if train_loader is not None:
                raise ValueError("pass train_loader or train_dataloader, not both")
            train_loader = train_dataloader
        self._apply_overrides(overrides)
        train_loader, eval_source = self._loaders(train_dataset, train_loader, eval_dataset, eval_loader)
        total = self._total_steps(train_loader, num_epochs, num_steps)
        if self.optimizer is None:
            self.optimizer = self._make_optimizer()
        if resume:
            self.load(self._checkpoint_root() if resume is True else resume)
        self._restore_data_position(train_loader)
        start, t0 = self.step, time.perf_counter()
        self._loop(self._micro_batches(train_loader), eval_source, total, t0, time_limit_s)
        losses = [line["loss"] for line in self.history if "loss" in line]
        summary = {"step": self.step, "steps_this_run": self.step - start,
                   "seconds": time.perf_counter() - t0, "loss": losses[-1] if losses else None,
                   "skipped_steps": self.skipped_steps}
        if self.config.out_dir is not None and self.step > start:
            summary["checkpoint"] = str(self.save())  # before evaluating: an evaluation error loses nothing
        if eval_source is not None:
            if not self.history or "eval_loss" not in self.history[-1]:
                self._log_eval(eval_source, None)
            summary["eval_loss"] = self.history[-1]["eval_loss"]
        return summary

    def _apply_overrides(self, overrides: dict) -> None:
        unknown = set(overrides) - {f.name for f in fields(TrainingConfig)}
        if unknown:
            raise TypeError(f"train() got unknown arguments {sorted(unknown)}")
        frozen = {"precision", "device"} | (FIXED_BY_OPTIMIZER if self.optimizer is not None else set())
        changed = sorted(k for k, v in overrides.items() if k in frozen and getattr(self.config, k) != v)
        if changed:
            raise ValueError(f"{changed} cannot change once the Trainer (or its optimizer) exists; pass them "
                             "to Trainer(...)")
        self.config = replace(self.config, **overrides)

    def _loaders(self, train_dataset, train_loader, eval_dataset, eval_loader):
        if (train_dataset is None) == (train_loader is None):
            raise ValueError("pass exactly one of train_dataset and train_loader")
        if train_dataset is not None:
            self._check_data(train_dataset)
            train_loader = self._batches(train_dataset, shuffle=True, drop_last=True)
        if eval_dataset is not None and eval_loader is not None:
            raise ValueError("pass eval_dataset or eval_loader, not both")
        eval_source = None
        if eval_dataset is not None:
            self._check_data(eval_dataset)
            eval_source = {"eval_dataset": eval_dataset}  # evaluate() batches it afresh each time
        elif eval_loader is not None:
            eval_source = {"eval_loader": eval_loader}
        self._train_data = train_loader
        return train_loader, eval_source

    def _restore_data_position(self, train_loader) -> None:
        if self._data_state is None:
            return
        state, skipping = self._data_state, not hasattr(train_loader, "load_state_dict")
        # (a loader of the user's own with state_dict() checks its state itself)
        keys = {"epoch", "batch"} if skipping else set(train_loader.state_dict()) if isinstance(
            train_loader, Batches) else set()
        if not keys <= set(state):  # a position saved for another kind of data
            raise ValueError(f"the checkpoint's data position {state} does not fit this run's "
                             f"{'train_loader' if skipping else type(train_loader).__name__} (it needs "
                             f"{sorted(keys)}): resume with the same kind of data as the run that saved it")
        if skipping:
            self._data_pos = {"epoch": state["epoch"], "batch": state["batch"]}
        else:
            train_loader.load_state_dict(state)
        self._data_state = None

    def _loop(self, stream, eval_source: dict | None, total: int, t0: float, time_limit_s: float | None) -> None:
        c = self.config
        warmup = c.warmup_steps if c.warmup_steps is not None else math.ceil(0.05 * total)
        bar = _progress_bar(total, self.step) if c.progress and self.is_main else None
        window = []
        try:
            while self.step < total:
                if time_limit_s is not None and time.perf_counter() - t0 > time_limit_s:
                    break
                for group in self.optimizer.param_groups:
                    group["lr"] = c.lr * lr_multiplier(self.step, total, warmup, c.min_lr_ratio)
                window.append(self._train_step(stream))
                if self.step % c.log_every == 0 or self.step == total:
                    self._log(window, bar)
                    window = []
                if eval_source is not None and c.eval_every and self.step % c.eval_every == 0:
                    self._log_eval(eval_source, bar)
                if c.save_every and self.step % c.save_every == 0:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
        if window:
            self._log(window, None)

    def _micro_batches(self, loader):
        """Batches forever, epoch after epoch; a loader without state_dict() resumes by skipping."""
        resumable = hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict")
        empty_epochs = 0
        while empty_epochs < 2:  # a resumed epoch may be finished already; two empty ones in a row are not
            it = iter(loader)
            if not resumable:
                for _ in itertools.islice(it, self._data_pos["batch"]):  # batches consumed before the resume
                    pass
            n = 0
            for batch in it:
                n += 1
                if not resumable:
                    self._data_pos["batch"] += 1
                yield batch
            if not resumable:
                self._data_pos = {"epoch": self._data_pos["epoch"] + 1, "batch": 0}
            empty_epochs = 0 if n else empty_epochs + 1
        raise ValueError("the training data yielded no batch (a one-shot iterator is used up after one "
                         "epoch: pass a re-iterable loader, or fewer num_steps)")

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _to_device(self, batch) -> tuple[Tensor, Tensor]:
        ids, labels = _split_batch(batch)
        limit = self._max_length()
        if ids.dim() != 2 or (limit is not None and ids.shape[1] > limit):
            raise ValueError(f"input_ids must be [B, S] with S <= max_length={limit}, got shape "
                             f"{tuple(ids.shape)}")
        return ids.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def _train_step(self, stream) -> dict:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; a step whose loss or
        gradients are not finite is not applied (see ``train``)."""
        c, t0 = self.config, time.perf_counter()
        self.model.train()
        accum, loss_sum, tokens = c.gradient_accumulation_steps, 0.0, 0
        for i in range(accum):
            ids, labels = self._to_device(next(stream))
            with self._sync(i == accum - 1), self._forward_context():
                with self._autocast():
                    loss = self.model(ids, labels=labels).loss
                self.scaler.scale(loss / accum).backward()
            loss_sum = loss_sum + loss.detach().float()
            tokens += ids.numel()
        loss = self._mean_over_ranks((loss_sum / accum).item())  # every rank sees the same, stops together
        self.scaler.unscale_(self.optimizer)
        norm = self._grad_norm()
        if c.precision == "fp16":  # GradScaler skips a step with Inf/NaN gradients and lowers the scale
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            applied = math.isfinite(loss) and self.scaler.get_scale() >= scale
        elif math.isfinite(loss) and math.isfinite(norm):
            self.optimizer.step()
            applied = True
        else:
            applied = False
        # fp16: skipping is how loss scaling finds its scale; once the scale is below 1 the scaled
        # gradients are smaller than the true ones, so what still overflows is not the scaling's doing
        scaling = c.precision == "fp16" and math.isfinite(loss) and self.scaler.get_scale() >= 1.0
        if not applied and c.on_nonfinite == "raise" and not scaling:
            message = self._nonfinite_message(loss, norm)  # names the parameters: before zero_grad
            if c.precision == "fp16" and math.isfinite(loss):
                message += f" (fp16: the loss scale fell to {self.scaler.get_scale():.3g} and still overflows)"
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(message)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.skipped_steps += not applied
        return {"loss": loss, "tokens": tokens * self.data_parallel[1], "seconds": time.perf_counter() - t0,
                "grad_norm": norm if c.gradient_clip is not None else None, "skipped": not applied}

    def _grad_norm(self) -> float:
        """The global gradient norm (NaN/Inf if any gradient is), clipping to ``gradient_clip``."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if not params:
            return 0.0
        norm = nn.utils.get_total_norm([p.grad for p in params])
        # FSDP2: a DTensor over the shards; full_tensor() reduces it (the clip takes the DTensor itself)
        value = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
        if self.config.gradient_clip is not None and math.isfinite(value):
            nn.utils.clip_grads_with_norm_(params, self.config.gradient_clip, norm)
        return value

    def _nonfinite_message(self, loss: float, norm: float) -> str:
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm} (loss {loss:.4g})"
        bad = [n for n, p in self.module.named_parameters()
               if p.grad is not None and not bool(torch.isfinite(_local(p.grad)).all())]
        names = ""
        if bad:  # on this rank: under FSDP2 each rank sees its own shards
            names = f"; non-finite gradients in {', '.join(bad[:8])}" + (f" and {len(bad) - 8} more"
                                                                         if len(bad) > 8 else "")
        where = last_good_checkpoint(self._checkpoint_root()) if self.config.out_dir else None
        return (f"{what} at step {self.step + 1}{names}; stopped before updating the weights. Last good "
                f"checkpoint: {where or 'none written'}. Try a lower lr (now "
                f"{self.optimizer.param_groups[0]['lr']:.3g}) or gradient_clip"
                + (", or bf16 instead of fp16" if self.config.precision == "fp16" else "")
                + ", or on_nonfinite='skip' to drop such steps")

    def _log(self, window: list[dict], bar) -> dict:
        seconds = sum(w["seconds"] for w in window)
        finite = [w["loss"] for w in window if math.isfinite(w["loss"])]
        line = {"step": self.step, "loss": sum(finite) / len(finite) if finite else None,
                "lr": self.optimizer.param_groups[0]["lr"],
                "tokens_per_s": sum(w["tokens"] for w in window) / seconds}
        if any(w["skipped"] for w in window):
            line["skipped_steps"] = sum(w["skipped"] for w in window)
        if window[-1]["grad_norm"] is not None and math.isfinite(window[-1]["grad_norm"]):
            line["grad_norm"] = window[-1]["grad_norm"]
        if self.config.precision == "fp16":
            line["loss_scale"] = self.scaler.get_scale()
        if self.config.log_memory_usage:
            line["peak_memory_kind"], line["peak_memory_bytes"] = _peak_memory(self.device)
        if bar is not None:
            post = {"loss": f"{line['loss']:.3f}" if finite else "-", "tok/s": f"{line['tokens_per_s']:.0f}"}
            if "peak_memory_bytes" in line:
                post["mem"] = f"{line['peak_memory_bytes'] / 2**20:.0f}MiB"
            bar.set_postfix(post, refresh=False)
            bar.update(self.step - bar.n)
        self._write_metrics(line)
        return line

    def _log_eval(self, eval_source: dict, bar) -> dict:
        line = {"step": self.step, "eval_loss": self.evaluate(**eval_source)}
        if bar is not None:
            bar.write(f"step {self.step}: eval loss {line['eval_loss']:.4f}")
        self._write_metrics(line)
        return line

    def _write_metrics(self, line: dict) -> None:
        self.history.append(line)
        if self.config.out_dir is not None and self.is_main:
            path = Path(self.config.out_dir) / "metrics.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(line) + "\n")

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, *, eval_loader=None) -> float:
        """Mean loss over the first ``config.eval_batches`` batches of ``eval_dataset`` (map-style, items
        [S], a list included: batched here in order, as ``train`` batches ``train_dataset``) or of
        ``eval_loader`` (an iterable of batches, as ``train_loader``)."""
        if (eval_dataset is None) == (eval_loader is None):
            raise ValueError("pass exactly one of eval_dataset (items [S]) and eval_loader (batches [B, S])")
        if eval_dataset is not None:
            if not (hasattr(eval_dataset, "__getitem__") and hasattr(eval_dataset, "__len__")):
                raise TypeError(f"eval_dataset must be map-style (len() and [i]), got "
                                f"{type(eval_dataset).__name__}; pass an iterable of batches as eval_loader")
            data = self._batches(eval_dataset, shuffle=False, drop_last=self.data_parallel[1] > 1)
        else:
            data = eval_loader
        was_training = self.module.training
        self.module.eval()
        total, n = 0.0, 0
        try:
            for batch in itertools.islice(data, self.config.eval_batches):
                ids, labels = self._to_device(batch)
                with self._autocast():
                    total += self.module(ids, labels=labels).loss.float().item()
                n += 1
        finally:
            self.module.train(was_training)
        if n == 0:
            raise ValueError("the evaluation data yielded no batch")
        return self._mean_over_ranks(total / n)

    # ------------------------------------------------------------ checkpoints

    def _checkpoint_root(self) -> Path:
        if self.config.out_dir is None:
            raise ValueError("checkpoints need out_dir; none was given")
        return Path(self.config.out_dir) / "checkpoints"

    def _rng_state(self) -> dict:
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        return {"cpu": torch.get_rng_state(), "cuda": cuda_rng}

    def _set_rng_state(self, rng: dict) -> None:
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _rng_states(self) -> list[dict]:
        """Every rank's RNG state, indexed by rank (a distributed subclass gathers them)."""
        return [self._rng_state()]

    def _model_state(self) -> dict | None:
        """The full weights to write (a sharded subclass gathers them; None on ranks that do not write)."""
        return self.module.state_dict()

    def _optimizer_state(self) -> dict | None:
        """``torch.optim``'s state dict format, parameters numbered in param_groups order."""
        return self.optimizer.state_dict() if self.optimizer is not None else None

    def _load_optimizer_state(self, state: dict) -> None:
        if self.optimizer is None:
            self.optimizer = self._make_optimizer()
        self.optimizer.load_state_dict(state)

    def state_dict(self) -> dict:
        """Everything but the weights that a bitwise resume needs. ``rng`` is a list indexed by rank.
        In a distributed subclass every rank must call this (it gathers)."""
        data = self._train_data
        return {"step": self.step,
                "optimizer": self._optimizer_state(),
                "scaler": self.scaler.state_dict(),
                "rng": self._rng_states(),
                "data": data.state_dict() if hasattr(data, "state_dict") else dict(self._data_pos),
                "config": asdict(self.config)}

    def load_state_dict(self, state: dict) -> None:
        check_state(state, self.rank)
        self.step = state["step"]
        if state["optimizer"] is not None:
            self._load_optimizer_state(state["optimizer"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        rng = [rng] if isinstance(rng, dict) else rng  # checkpoints before per-rank RNG: one dict
        if self.rank < len(rng):  # a rank the writing run did not have keeps its own RNG state
            self._set_rng_state(rng[self.rank])
        self._data_state = state["data"]

    def save(self, root=None) -> Path:
        """Write a checkpoint of the current step under ``root`` (default: out_dir/checkpoints).
        FloatingPointError, on every rank and before anything is written, if a weight is not finite."""
        root = Path(root) if root is not None else self._checkpoint_root()
        path = root / f"step-{self.step:06d}"
        bad = [n for n, p in self.module.named_parameters() if not bool(torch.isfinite(_local(p)).all())]
        if self._mean_over_ranks(float(len(bad))) > 0:  # every rank stops, none waits in a gather
            raise FloatingPointError(f"refusing to write checkpoint step {self.step}: non-finite weights in "
                                     f"{', '.join(bad[:8]) or 'another rank'}")
        weights, state = self._model_state(), self.state_dict()  # every rank: these may gather
        if self.is_main:
            path = save_checkpoint(root, self.step, weights, state, model_metadata(self.module),
                                   keep=self.config.keep_checkpoints)
        self._barrier()
        return path

    def load(self, path, allow_config_changes: Iterable[str] | bool = ()) -> None:
        """Load weights and trainer state from a checkpoint folder, or the latest one under a root.
        Everything is checked before anything changes: checksums, tensor shapes, the model class and
        config (``allow_config_changes``: field names that may differ, or True), the state's layout."""
        tensors, state = read_checkpoint(path, self.module, allow_config_changes)
        check_state(state, self.rank)
        self.module.load_state_dict(tensors)
        self.load_state_dict(state)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # FSDP2 DTensor: this rank's shard


def check_state(state, rank: int = 0) -> None:
    """ValueError unless ``state`` has the layout ``Trainer.state_dict`` writes (loading anything else
    would fail half-way with a KeyError or a generator-size error)."""
    if not isinstance(state, dict):
        raise ValueError(f"trainer state must be a dict, got {type(state).__name__}: not a trainer.pt "
                         "written by Trainer.save")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"trainer state lacks {missing} (has {sorted(map(str, state))}): not a trainer.pt "
                         "written by Trainer.save")
    if isinstance(state["step"], bool) or not isinstance(state["step"], int) or state["step"] < 0:
        raise ValueError(f"trainer state 'step' must be an int >= 0, got {state['step']!r}")
    rng = state["rng"]
    rng = [rng] if isinstance(rng, dict) else rng
    cpu_size = torch.get_rng_state().numel()
    if not isinstance(rng, list) or (rank < len(rng) and not _rng_ok(rng[rank], cpu_size)):
        raise ValueError(f"trainer state 'rng' must hold, per rank, {{'cpu': uint8 tensor of {cpu_size} bytes, "
                         f"'cuda': list}}; got {str(rng)[:120]}")
    for key in ("optimizer", "scaler", "data"):
        if state[key] is not None and not isinstance(state[key], dict):
            raise ValueError(f"trainer state {key!r} must be a dict or None, got {type(state[key]).__name__}")


def _rng_ok(entry, cpu_size: int) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("cpu"), Tensor) and entry["cpu"].dtype == torch.uint8
            and entry["cpu"].numel() == cpu_size and isinstance(entry.get("cuda"), (list, tuple)))
