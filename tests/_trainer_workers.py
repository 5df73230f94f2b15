"""Helpers for tests/test_distributed_trainer.py: the tiny run both sides share, a launcher, the workers.

Same pattern as ``_dist_workers.py``: workers run in ``spawn``-ed processes, so they live in a plain
module the children can import by name; each returns a dict of tensors and plain values that the
launcher saves per rank, and a worker that raises sends its traceback back instead.

The run: ``ReversibleGPT`` on the 'tiny' preset (2 blocks, d = 96, GQA) trained for ``STEPS`` AdamW
steps on packed byte-level text. The single-process reference is ``Trainer`` with ``batch_size =
GLOBAL_BATCH``; a distributed rank is ``DistributedReversibleTrainer`` with ``batch_size =
GLOBAL_BATCH / WORLD``, and the trainer's rank sharding (``Batches(rank, world_size)``) hands rank r
sequences ``[r * b, (r + 1) * b)`` of each global batch of the same seeded order, so both see the same
sequences at every step.
"""
from __future__ import annotations


import _spawn
from helpers import rel_err, worst_rel_err  # noqa: F401 (the tests use them from here)
import torch
import torch.distributed as dist

from revnet_zero.data import ByteTokenizer, PackedDataset
from revnet_zero.models import ReversibleGPT, TransformerConfig
from revnet_zero.training import DistributedReversibleTrainer, Trainer

WORLD = 2
STEPS = 3
HALF = 2    # checkpoint tests: HALF steps, save, HALF more
GLOBAL_BATCH = 4
SEQ = 32
TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 12
# lr 3e-3 with one warm-up step moves every weight by about lr per step (AdamW); gradient_clip 0.5
# lies below the gradient norms of these steps (about 1 to 4), so the clipping coefficient, which
# needs the global norm over all ranks' shards, acts on every step.
TRAIN = dict(lr=3e-3, warmup_steps=1, gradient_clip=0.5, weight_decay=0.1, seed=0, log_every=1,
             progress=False, log_memory_usage=False, device="cpu")


# ------------------------------------------------------------------------------ the shared run
def build_model(seed: int = 0) -> ReversibleGPT:
    torch.manual_seed(seed)
    return ReversibleGPT(TransformerConfig.preset("tiny", vocab_size=ByteTokenizer.vocab_size, max_seq_len=SEQ))


def dataset() -> PackedDataset:
    return PackedDataset.from_texts([TEXT], ByteTokenizer(), SEQ)  # 32 sequences of 32 tokens


def params_of(model) -> dict[str, torch.Tensor]:
    """Full fp32 parameters by name; an FSDP2-sharded parameter (a DTensor) is gathered first (every
    rank must call this: ``full_tensor`` is an all-gather)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = t.detach().clone()
    return out


def history_of(trainer) -> list[dict]:
    return [{k: line[k] for k in ("step", "loss", "grad_norm", "lr")} for line in trainer.history]


def single_process_run(**overrides) -> dict:
    """The reference: one process, plain ``Trainer``, the whole global batch per step."""
    model = build_model()
    initial = params_of(model)
    trainer = Trainer(model, **{**TRAIN, **overrides}, batch_size=GLOBAL_BATCH)
    trainer.train(train_dataset=dataset(), num_steps=STEPS)
    return {"params": params_of(model), "initial": initial, "history": history_of(trainer)}


# -------------------------------------------------------------------------------------- launcher
def run_workers(worker_name: str, world: int = WORLD, **kwargs) -> list[dict]:
    """Run ``worker_name(rank, world, **kwargs)`` in ``world`` spawned processes; return each rank's result."""
    return _spawn.run_workers(__name__, worker_name, world, **kwargs)



# --------------------------------------------------------------------------------------- workers
def _record_collectives(seen: dict) -> None:
    """Wrap the collectives FSDP2 calls (looked up on ``torch.distributed`` at call time) to record
    the dtype of what each one carries: all-gather inputs (``param_dtype``), reduce-scatter inputs
    (``reduce_dtype``)."""
    names = {"all_gather_single": "all_gather", "all_gather_into_tensor": "all_gather",
             "reduce_scatter_single": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter"}
    for name, kind in names.items():
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def wrapped(*args, _fn=fn, _kind=kind, **kw):
            inp = kw.get("input", kw.get("input_tensor", args[1] if len(args) > 1 else None))
            if isinstance(inp, torch.Tensor):
                seen.setdefault(_kind, set()).add(str(inp.dtype))
            return _fn(*args, **kw)
        setattr(dist, name, wrapped)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def trainer_worker(rank: int, world: int, sharding_strategy: str, **options) -> dict:
    """``STEPS`` steps of DistributedReversibleTrainer(sharding_strategy, **options) on this rank's
    half of each global batch. Returns the gathered parameters, the metrics history, and what was
    observed along the way: the dtypes of the parameters and streams inside forward, of the
    gradients the optimizer stepped on, of what the collectives carried, and where the sharded
    parameters and their optimizer state live."""
    model = build_model()
    seen = {"forward_param": set(), "root_param": set(), "stream": set(), "grad": set(),
            "optimizer_param": set(), "optimizer_param_device": set(), "optimizer_state_device": set()}
    block = model.blocks.blocks[0]
    block.coupling.f.wq.register_forward_pre_hook(
        lambda m, args: seen["forward_param"].add(str(m.weight.dtype)))
    model.embed.register_forward_pre_hook(lambda m, args: seen["root_param"].add(str(m.weight.dtype)))
    block.register_forward_pre_hook(lambda m, args: seen["stream"].update(str(a.dtype) for a in args[:2]))
    if sharding_strategy == "fsdp":
        _record_collectives(seen)

    accum = options.get("gradient_accumulation_steps", 1)
    trainer = DistributedReversibleTrainer(model, sharding_strategy=sharding_strategy,
                                           **{**TRAIN, **options}, batch_size=GLOBAL_BATCH // (world * accum))
    # train() builds the optimizer only when there is none yet: build it here to watch its steps
    trainer.optimizer = opt = trainer._make_optimizer()

    def pre_step(opt, args, kwargs):
        for group in opt.param_groups:
            for p in group["params"]:
                seen["optimizer_param"].add(str(p.dtype))
                seen["optimizer_param_device"].add(_local(p).device.type)
                if p.grad is not None:
                    seen["grad"].add(str(p.grad.dtype))

    def post_step(opt, args, kwargs):
        for state in opt.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:   # exp_avg, exp_avg_sq (not step)
                    seen["optimizer_state_device"].add(_local(v).device.type)
    opt.register_step_pre_hook(pre_step)
    opt.register_step_post_hook(post_step)
    trainer.train(train_dataset=dataset(), num_steps=STEPS)
    return {"params": params_of(model), "history": history_of(trainer),
            "seen": {k: sorted(v) for k, v in seen.items()},
            "param_types": sorted({type(p).__name__ for p in model.parameters()}),
            "precision": trainer.config.precision, **_fsdp_layout(model)}


def _fsdp_layout(model) -> dict:
    """Which modules ``fully_shard`` was applied to, and whether their parameters are offloaded to the
    host. The latter is FSDP2's private per-parameter flag (``FSDPParam.offload_to_cpu``): on a
    CPU-only machine host and device are the same memory, so no placement tells it apart."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch 2.5
        from torch.distributed._composable.fsdp import FSDPModule
    sharded = [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    offload = set()
    for name in sharded:
        state = model.get_submodule(name)._get_fsdp_state()
        for group in state._fsdp_param_groups:
            offload.update(fp.offload_to_cpu for fp in group.fsdp_params)
    return {"fsdp_modules": sharded, "offload_to_cpu": sorted(offload)}


def fsdp_checkpoint_worker(rank: int, world: int, out_dir: str, single_checkpoint: str,
                           **options) -> dict:
    """Checkpoints under FSDP2 (``options`` go to every trainer), all in these processes: run A trains
    ``2 * HALF`` steps straight; run B, a fresh model and trainer, trains the same steps writing a
    checkpoint every ``HALF`` steps to ``out_dir``; run C, fresh again, resumes from B's
    step-``HALF`` checkpoint and trains the rest (its final checkpoint goes to ``out_dir/resumed``);
    run D, fresh, loads ``single_checkpoint`` (written by a single-process Trainer). Returns the
    gathered parameters and histories of A, B, C, and D's parameters, step and AdamW first moments."""
    def run(**more):
        model = build_model()
        trainer = DistributedReversibleTrainer(model, sharding_strategy="fsdp", **{**TRAIN, **options, **more},
                                               batch_size=GLOBAL_BATCH // world)
        return model, trainer

    out = {}
    model, trainer = run()
    trainer.train(train_dataset=dataset(), num_steps=2 * HALF)
    out["A"] = {"params": params_of(model), "history": history_of(trainer)}
    model, trainer = run(out_dir=out_dir, save_every=HALF)
    trainer.train(train_dataset=dataset(), num_steps=2 * HALF)
    out["B"] = {"params": params_of(model), "history": history_of(trainer)}
    model, trainer = run(out_dir=f"{out_dir}/resumed")
    trainer.train(train_dataset=dataset(), num_steps=2 * HALF,
                  resume=f"{out_dir}/checkpoints/step-{HALF:06d}")
    out["C"] = {"params": params_of(model), "history": history_of(trainer)}
    model, trainer = run()
    trainer.load(single_checkpoint)
    state = trainer.optimizer.state
    out["D"] = {"params": params_of(model), "step": trainer.step,
                "exp_avg": {name: state[p]["exp_avg"].full_tensor() for name, p in model.named_parameters()}}
    return out
