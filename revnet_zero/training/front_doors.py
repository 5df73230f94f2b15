"""Three trainer names: thin front doors over ``Trainer`` with arguments of their own.

An argument that asks for something RevNet-Zero does not do raises a ValueError saying so; none
is accepted and ignored.
"""
from __future__ import annotations

import torch
from torch import nn

from .trainer import Trainer, TrainingConfig


class LongContextTrainer(Trainer):
    """Trainer for long sequences: ``max_length`` tokens per sequence, gradients accumulated over
    ``gradient_accumulation_steps`` micro-batches.

    ``attention_window_size=w`` switches a model built with exact attention to sliding-window attention
    over the last w tokens, ``use_linear_attention_approximation=True`` to random-feature (linear)
    attention, keeping the weights, with a warning saying so (``self.attention_change``); a model that
    already uses that attention is left as it is. Building the model with ``TransformerConfig(attention=
    ...)`` is the direct way (see docs/attention.md).

    Example::

        trainer = LongContextTrainer(model, max_length=262144, gradient_accumulation_steps=32)
        trainer.train(train_dataset=long_docs, eval_dataset=val, num_epochs=3, batch_size=1)
    """

    def __init__(self, model: nn.Module, max_length: int | None = None, gradient_accumulation_steps: int = 1,
                 use_linear_attention_approximation: bool = False, attention_window_size: int | None = None,
                 config: TrainingConfig | None = None, **overrides):
        model_max = getattr(getattr(model, "config", None), "max_seq_len", None)
        if max_length is not None and model_max is not None and max_length > model_max:
            raise ValueError(f"max_length={max_length} exceeds the model's max_seq_len={model_max}")
        from .attention_options import apply_attention_options
        self.attention_change = apply_attention_options(model, attention_window_size,
                                                        use_linear_attention_approximation)
        super().__init__(model, config, max_length=max_length,
                         gradient_accumulation_steps=gradient_accumulation_steps, **overrides)


class ReversibleAMPTrainer(Trainer):
    """Trainer in mixed precision: fp16 autocast with dynamic loss scaling (``fp16=True``) or bf16
    autocast (``fp16=False``, no scaling needed). Weights, optimizer state and the reversible streams
    stay fp32.

    ``loss_scale``: only ``'dynamic'`` (torch.amp.GradScaler). ``keep_batchnorm_fp32``: autocast
    already runs normalisation in fp32, so True is what happens; False raises.

    Example::

        amp_trainer = ReversibleAMPTrainer(model, fp16=True, loss_scale="dynamic")
        amp_trainer.train(train_loader=train_loader, num_steps=100000, gradient_clip=1.0)
    """

    def __init__(self, model: nn.Module, fp16: bool = True, loss_scale: str = "dynamic",
                 keep_batchnorm_fp32: bool = True, config: TrainingConfig | None = None, **overrides):
        if loss_scale != "dynamic":
            raise ValueError(f"loss_scale={loss_scale!r}: only 'dynamic' loss scaling is implemented")
        if not keep_batchnorm_fp32:
            raise ValueError("keep_batchnorm_fp32=False: normalisation in fp16 is not offered; autocast "
                             "keeps it in fp32")
        super().__init__(model, config, precision="fp16" if fp16 else "bf16", **overrides)


# JAX-style names of remat policies, and ours, mapped to the reversible stack's policy
_POLICIES = {"nothing_saveable": "recompute", "everything_saveable": "store",
             "recompute": "recompute", "store": "store"}


class DistributedReversibleTrainer(Trainer):
    """Trainer over ``torch.distributed`` ranks: DDP (a full copy per rank) or FSDP2 (``fully_shard``
    per reversible block, then the whole model). Start the processes with torchrun and call
    ``torch.distributed.init_process_group`` first.

    Each rank takes its own ``batch_size`` sequences of every global batch (``Batches(rank,
    world_size)``), so one step sees ``batch_size * world_size`` sequences, as ``Trainer`` does with
    that batch size on one device; gradients are averaged over the ranks.

    ``gradient_checkpointing_policy``: ``'nothing_saveable'`` (= ``'recompute'``: reversible, no
    activations kept) or ``'everything_saveable'`` (= ``'store'``: plain autograd). ``cpu_offload``
    (FSDP only) keeps parameters, gradients and optimizer state in host memory
    (``CPUOffloadPolicy``; pinned when training on CUDA). ``mixed_precision`` (FSDP only):
    ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32, cast_forward_inputs=False)``: the
    parameters are all-gathered and used in bf16 and the gradients reduced in fp32, while the sharded
    parameters, the optimizer state and the reversible streams stay fp32 (block inputs are not cast,
    so the streams' sums and their inversion stay accurate). The sub-functions then meet fp32 streams
    with bf16 weights, so it needs bf16 autocast: ``precision`` defaults to ``'bf16'`` with it, and
    any other explicit value raises.

    Checkpoints (both strategies) are the files ``Trainer`` writes, so they load in either: rank 0
    writes the full weights and optimizer state (FSDP2 gathers them to its host memory), and the
    RNG state of every rank, restored per rank. Every rank must call ``save`` and ``load``; under
    FSDP2 only rank 0 reads the files and broadcasts them, so they need not be on a shared file system.

    Example::

        torch.distributed.init_process_group("nccl")
        trainer = DistributedReversibleTrainer(model, sharding_strategy="ddp")
        trainer.train(train_dataloader=train_loader, num_epochs=10, log_memory_usage=True)

        fsdp = DistributedReversibleTrainer(model, sharding_strategy="fsdp", mixed_precision=True)
    """

    def __init__(self, model: nn.Module, sharding_strategy: str = "fsdp",
                 gradient_checkpointing_policy: str = "nothing_saveable", cpu_offload: bool = False,
                 mixed_precision: bool = False, config: TrainingConfig | None = None, *,
                 sequence_parallel: int = 1, sequence_parallel_mode: str = "all_to_all", **overrides):
        import torch.distributed as dist
        if sharding_strategy not in ("fsdp", "ddp"):
            raise ValueError(f"sharding_strategy must be 'fsdp' or 'ddp', got {sharding_strategy!r}")
        if gradient_checkpointing_policy not in _POLICIES:
            raise ValueError(f"gradient_checkpointing_policy must be one of {sorted(_POLICIES)}, got "
                             f"{gradient_checkpointing_policy!r}")
        if cpu_offload and sharding_strategy != "fsdp":
            raise ValueError("cpu_offload=True needs sharding_strategy='fsdp'")
        if mixed_precision:
            if sharding_strategy != "fsdp":
                raise ValueError("mixed_precision=True needs sharding_strategy='fsdp' (it is FSDP2's "
                                 "MixedPrecisionPolicy); with DDP use precision='bf16' (autocast)")
            precision = overrides.get("precision", config.precision if config is not None else "bf16")
            if precision != "bf16":
                raise ValueError(f"mixed_precision=True computes with bf16 parameters under bf16 "
                                 f"autocast; precision={precision!r} contradicts it (leave it out, or "
                                 "pass precision='bf16')")
            overrides["precision"] = "bf16"
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistributedReversibleTrainer needs torch.distributed initialised: start the "
                               "processes with torchrun and call torch.distributed.init_process_group() "
                               "first; on one device use Trainer")
        blocks = getattr(model, "blocks", None)
        if blocks is not None and hasattr(blocks, "set_policy"):
            blocks.set_policy(_POLICIES[gradient_checkpointing_policy])
        elif gradient_checkpointing_policy not in ("nothing_saveable", "recompute"):
            raise ValueError(f"{type(model).__name__} has no reversible .blocks to set "
                             f"{gradient_checkpointing_policy!r} on")
        self.sharding_strategy, self.cpu_offload = sharding_strategy, cpu_offload
        self.mixed_precision = mixed_precision
        self._dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.sequence_parallel = self._split_sequences(model, sequence_parallel, sequence_parallel_mode)
        super().__init__(model, config, **overrides)

    def _split_sequences(self, model: nn.Module, n: int, mode: str):
        """Groups of ``n`` consecutive ranks share each sequence (``revnet_zero.distributed``)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or self.world_size % n:
            raise ValueError(f"sequence_parallel must be a positive int dividing the world size "
                             f"{self.world_size}, got {n!r}")
        from ..distributed.sequence_parallel import MODES
        if mode not in MODES:   # checked with sequence_parallel=1 too: a typo must not wait for a bigger run
            raise ValueError(f"sequence_parallel_mode must be one of {MODES}, got {mode!r}")
        if n == 1:
            return None
        from ..distributed import enable_sequence_parallel
        groups = [self._dist.new_group(list(range(g, g + n))) for g in range(0, self.world_size, n)]
        return enable_sequence_parallel(model, groups[self.rank // n] if len(groups) > 1 else None, mode)

    @property
    def data_parallel(self) -> tuple[int, int]:
        """(index, count) of this rank's data shard: ranks that split one sequence read the same batches."""
        n = self.sequence_parallel.size if self.sequence_parallel is not None else 1
        return self.rank // n, self.world_size // n

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.sharding_strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        try:
            from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
        except ImportError:  # torch 2.5
            from torch.distributed._composable.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
        from torch.distributed.device_mesh import init_device_mesh
        # The mesh on the trainer's device (FSDP2's default mesh follows the accelerator, not config.device)
        kwargs = {"mesh": init_device_mesh(self.device.type, (self.world_size,))}
        if self.cpu_offload:  # pinned host memory needs CUDA; on a CPU-only machine it cannot be had
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
        if self.mixed_precision:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                       cast_forward_inputs=False)
        for block in getattr(getattr(model, "blocks", None), "blocks", []):
            fully_shard(block, **kwargs)
        return fully_shard(model, **kwargs)

    def _forward_context(self):
        if self.sharding_strategy == "ddp":
            return super()._forward_context()
        from ..engine import trusted_hooks
        # fully_shard's per-block hooks unshard/reshard parameters and pass the stream gradients
        # through unchanged: the engine may keep handing them from block to block in place
        return trusted_hooks()

    def _sync(self, last_micro_batch: bool):
        if last_micro_batch or self.sharding_strategy != "ddp":
            return super()._sync(last_micro_batch)
        return self.model.no_sync()

    def _mean_over_ranks(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        self._dist.all_reduce(t)
        return t.item() / self.world_size

    def _barrier(self) -> None:
        self._dist.barrier()

    # ------------------------------------------------------------ checkpoints
    # Same files as one process: rank 0 writes the full weights and trainer state, the RNG state is a
    # list with one entry per rank. Under FSDP2 the full state is gathered to rank 0 (host memory)
    # with torch.distributed.checkpoint.state_dict and, on load, read by rank 0 alone and broadcast
    # to the other ranks, which keep only their shards; no rank but 0 needs the files.

    def _rng_states(self) -> list[dict]:
        states = [None] * self.world_size
        self._dist.all_gather_object(states, self._rng_state())
        return states

    def _model_state(self) -> dict | None:
        if self.sharding_strategy != "fsdp":
            return super()._model_state()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.module, options=options)

    def _optimizer_state(self) -> dict | None:
        if self.sharding_strategy != "fsdp" or self.optimizer is None or not self.optimizer.state:
            # (an optimizer that has not stepped holds no tensors: its own state dict is the full one,
            # and get_optimizer_state_dict would step it once with lr 0 to create state)
            return super()._optimizer_state()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        full = get_optimizer_state_dict(self.module, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        # keyed by parameter name; torch.optim numbers the parameters in param_groups order
        index = {name: i for i, name in enumerate(n for g in full["param_groups"] for n in g["params"])}
        groups, start = [], 0
        for g in full["param_groups"]:
            groups.append({**g, "params": list(range(start, start + len(g["params"])))})
            start += len(g["params"])
        return {"state": {index[name]: s for name, s in full["state"].items()}, "param_groups": groups}

    def load(self, path, allow_config_changes=()) -> None:
        if self.sharding_strategy != "fsdp":
            return super().load(path, allow_config_changes)  # DDP: every rank reads the files (full copies)
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        from .checkpoint import read_checkpoint
        from .trainer import check_state
        weights, optim, message = {}, None, [None]
        if self.is_main:
            try:
                weights, state = read_checkpoint(path, self.module, allow_config_changes)
                check_state(state)
                optim = state["optimizer"]
                # the optimizer's tensors go by set_optimizer_state_dict's broadcast; the rest as objects
                full = optim is not None and bool(optim["state"])
                if full:
                    optim = self._named_optimizer_state(optim)
                message = [{**state, "optimizer": "full" if full else optim}]
            except Exception as e:  # every rank raises, none waits in a broadcast
                message = [e]
        self._dist.broadcast_object_list(message, src=0)
        if isinstance(message[0], Exception):
            raise message[0]
        state = message[0]
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(self.module, weights, options=options)
        if state["optimizer"] == "full":
            if self.optimizer is None:
                self.optimizer = self._make_optimizer()
            set_optimizer_state_dict(self.module, self.optimizer, optim if self.is_main else {},
                                     options=options)
            state["optimizer"] = None
        self.load_state_dict(state)

    def _named_optimizer_state(self, state: dict) -> dict:
        """A torch.optim state dict (parameters numbered in param_groups order) keyed by parameter
        name instead, as set_optimizer_state_dict takes it."""
        optimizer = self.optimizer if self.optimizer is not None else self._make_optimizer()  # its order
        names = {id(p): name for name, p in self.module.named_parameters()}
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        saved = sum(len(g["params"]) for g in state["param_groups"])
        if saved != len(order):
            raise ValueError(f"the checkpoint's optimizer has {saved} parameters, this trainer's {len(order)}")
        groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
        return {"state": {order[i]: s for i, s in state["state"].items()}, "param_groups": groups}
