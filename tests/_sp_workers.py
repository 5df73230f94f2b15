"""Workers for tests/test_sequence_parallel.py (spawned processes joined by gloo; see _spawn.py).

Every worker builds the same tiny model on every rank, runs it once on one process's worth of data
with the whole sequence (the reference, no communication) and once with the sequence split over the
ranks, and returns both losses and gradients for the test process to compare.
"""
from __future__ import annotations

import copy

import _spawn
import torch

from revnet_zero import ReversibleTransformer, TransformerConfig
from revnet_zero.models import ReversibleBERT
from revnet_zero.distributed import average_gradients, enable_sequence_parallel

SEQ, BATCH = 24, 2   # 24 splits over 2, 3 and 4 ranks


def build(num_kv_heads: int = 2, policy: str = "recompute", seed: int = 0, bert: bool = False,
          dtype: str = "float32", **overrides) -> ReversibleTransformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(**{**dict(vocab_size=61, num_layers=3, d_model=48, num_heads=4, causal=not bert,
                                      num_kv_heads=num_kv_heads, max_seq_len=64, loss_chunk_size=7), **overrides})
    model = (ReversibleBERT if bert else ReversibleTransformer)(cfg).to(getattr(torch, dtype))
    model.blocks.set_policy(policy)
    return model


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[0, 5:9] = -100        # ignored targets, unevenly spread over the shards
    labels[1, -3:] = -100
    return ids, labels


def grads(model) -> dict:
    out = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        g = p.grad
        out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def reference(model, ids, labels) -> dict:
    ref = copy.deepcopy(model)
    ref.blocks.set_policy("store")
    loss = ref(ids, labels=labels).loss
    loss.backward()
    return {"loss": loss.detach(), "grads": grads(ref)}


def sp_worker(rank: int, world: int, mode: str, num_kv_heads: int, policy: str, **build_kwargs) -> dict:
    """Sequence parallel (no data-parallel wrapper; ``average_gradients``) vs one process."""
    model = build(num_kv_heads, policy, **build_kwargs)
    ids, labels = batch()
    want = reference(model, ids, labels)
    sp = enable_sequence_parallel(model, mode=mode)
    loss = model(ids, labels=labels).loss
    loss.backward()
    average_gradients(model, sp)
    return {"loss": loss.detach(), "grads": grads(model), "want": want}


def sp_group_of_one_worker(rank: int, world: int, seq: int) -> dict:
    """The ring on a group of one rank (each rank its own ``new_group``): the whole sequence of any
    length, as one process."""
    import torch.distributed as dist
    groups = [dist.new_group([r]) for r in range(world)]
    model = build()
    ids, labels = (t[:, :seq] for t in batch())
    want = reference(model, ids, labels)
    enable_sequence_parallel(model, group=groups[rank], mode="ring")
    loss = model(ids, labels=labels).loss
    loss.backward()
    return {"loss": loss.detach(), "grads": grads(model), "want": want}


def sp_no_targets_worker(rank: int, world: int, mode: str) -> dict:
    """A batch whose labels are all ignored (-100): split and whole, the loss and the gradients."""
    model = build()
    ids, labels = batch()
    labels[:] = -100
    ref = copy.deepcopy(model)
    want = ref(ids, labels=labels).loss
    want.backward()
    sp = enable_sequence_parallel(model, mode=mode)
    loss = model(ids, labels=labels).loss
    loss.backward()
    average_gradients(model, sp)
    return {"loss": loss.detach(), "grads": grads(model), "want": {"loss": want.detach(), "grads": grads(ref)}}


def sp_enable_after_ddp_worker(rank: int, world: int, mode: str) -> dict:
    """``enable_sequence_parallel`` called on the DDP wrapper instead of the model inside it."""
    model = build()
    ids, labels = batch()
    want = reference(model, ids, labels)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    enable_sequence_parallel(ddp, mode=mode)
    loss = ddp(ids, labels=labels).loss
    loss.backward()
    return {"loss": loss.detach(), "grads": grads(model), "want": want}


def sp_fsdp2_worker(rank: int, world: int, mode: str) -> dict:
    """Sequence parallel inside FSDP2 (``fully_shard`` per block, then the root) vs one process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    model = build()
    ids, labels = batch()
    want = reference(model, ids, labels)
    enable_sequence_parallel(model, mode=mode)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    loss = model(ids, labels=labels).loss
    loss.backward()
    return {"loss": loss.detach(), "grads": grads(model), "want": want}


def sp_scheduler_worker(rank: int, world: int) -> dict:
    """A memory scheduler on a ring-split model, each rank given a profile whose timings favour another
    policy (as measured timings may): the ranks must still run one plan, or a block that recomputes on
    one rank and not on the other pairs mismatched collectives."""
    from revnet_zero.memory import MemoryScheduler
    from revnet_zero.memory.profiler import LayerCost, MemoryProfile
    model = build()
    ids, labels = batch()
    want = reference(model, ids, labels)
    sp = enable_sequence_parallel(model, mode="ring")
    fastest = "store" if rank == 0 else "recompute"
    costs = [{p: LayerCost(1000 if p == "store" else 10, 0, 1.0 if p == fastest else 2.0, 0.0)
              for p in ("store", "recompute", "store_attention")} for _ in model.blocks.blocks]
    MemoryScheduler(model, memory_budget=2**34, profile=MemoryProfile(tuple(ids.shape), "cpu", 0, 0, costs))
    loss = model(ids, labels=labels).loss
    loss.backward()
    average_gradients(model, sp)
    return {"loss": loss.detach(), "grads": grads(model), "want": want,
            "policies": [b.policy for b in model.blocks.blocks]}


def sp_eval_worker(rank: int, world: int, mode: str = "all_to_all") -> dict:
    """Eval forward under no_grad with the sequence split: the same loss as one process."""
    model = build().eval()
    ids, labels = batch()
    with torch.no_grad():
        want = model(ids, labels=labels).loss
        enable_sequence_parallel(model, mode=mode)
        got = model(ids, labels=labels).loss
    return {"loss": got, "want": want}


def sp_refusals_worker(rank: int, world: int) -> dict:
    """Bad configurations raise ValueError with the values in the message."""
    messages = {}
    model = build()
    enable_sequence_parallel(model)
    ids = torch.randint(0, 61, (1, SEQ + 1))
    for name, fn in {
        "odd length": lambda: model(ids),
        "heads": lambda: enable_sequence_parallel(build(num_heads=3, num_kv_heads=3)),
        "mode": lambda: enable_sequence_parallel(build(), mode="ring_flash"),
        "ring length": lambda: build_ring()(batch()[0][:, :SEQ - 2]),
        "ring dropout": lambda: enable_sequence_parallel(build(attention_dropout=0.1), mode="ring"),
        "ring mask": lambda: _ring_bert_with_mask(),
        "generate": lambda: model.eval().generate(ids[:, :4], max_new_tokens=2),
        "variant": lambda: enable_sequence_parallel(build(attention="sliding_window", attention_window=4)),
        # each rank its own batch (a data loader per rank): once trained on a mix of sequences silently
        "different ids": lambda: model.train()(torch.full((1, SEQ), rank, dtype=torch.long)),
        "different labels": lambda: model(batch()[0], labels=batch()[1].roll(rank, dims=1)),
        "different lengths": lambda: model(batch()[0][:, :SEQ - 2 * rank]),
        "pickle": lambda: __import__("pickle").dumps(build_ring()),
    }.items():
        try:
            fn()
        except (ValueError, TypeError) as e:
            messages[name] = f"{type(e).__name__}: {e}"
    return messages


def build_ring():
    model = build()
    enable_sequence_parallel(model, mode="ring")
    return model


def _ring_bert_with_mask():
    model = build(bert=True)
    enable_sequence_parallel(model, mode="ring")
    ids, labels = batch()
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0    # row 1 is padded
    model(ids, labels=labels, attention_mask=mask)


def trainer_worker(rank: int, world: int, sequence_parallel: int, sharding_strategy: str,
                   out_dir: str | None = None, steps: int | None = None, resume: bool = False,
                   sequence_parallel_mode: str = "all_to_all") -> dict:
    """DistributedReversibleTrainer with ``sequence_parallel`` ranks per sequence on the run of
    ``_trainer_workers`` (its single-process reference sees the same global batches)."""
    import _trainer_workers as T
    from revnet_zero.training import DistributedReversibleTrainer
    data_ranks = world // sequence_parallel
    trainer = DistributedReversibleTrainer(T.build_model(), sharding_strategy=sharding_strategy,
                                           sequence_parallel=sequence_parallel,
                                           sequence_parallel_mode=sequence_parallel_mode,
                                           batch_size=T.GLOBAL_BATCH // data_ranks, out_dir=out_dir,
                                           **T.TRAIN)
    trainer.train(train_dataset=T.dataset(), num_steps=steps or T.STEPS, resume=resume)
    if out_dir is not None and not resume:
        trainer.save()
    return {"params": T.params_of(trainer.module), "history": T.history_of(trainer)}


def run(worker: str, world: int, **kwargs) -> list:
    return _spawn.run_workers(__name__, worker, world, **kwargs)


def trainer_refusal_worker(rank: int, world: int, sequence_parallel: int = 3, **options) -> str:
    import _trainer_workers as T
    from revnet_zero.training import DistributedReversibleTrainer
    try:
        DistributedReversibleTrainer(T.build_model(), sharding_strategy="ddp", sequence_parallel=sequence_parallel,
                                     **options, **T.TRAIN)
    except ValueError as e:
        return str(e)
    return "no error"


# --------------------------------------------------------------------------- CUDA (tests/test_sequence_parallel_gpu.py)
def gloo_cuda_probe(rank: int, world: int) -> str:
    """'' if gloo runs the ring's collectives (all-to-all, all-gather) on CUDA tensors, else the error."""
    import torch.distributed._functional_collectives as fc
    try:
        x = torch.full((4,), float(rank), device="cuda")
        moved = fc.permute_tensor(x, [(r + 1) % world for r in range(world)], torch.distributed.group.WORLD)
        fc.all_gather_tensor(x, 0, torch.distributed.group.WORLD).wait()
        assert float(moved.wait()[0]) == (rank - 1) % world
    except Exception as e:  # noqa: BLE001 - the probe reports whatever gloo says
        return f"{type(e).__name__}: {e}"
    return ""


def sp_cuda_worker(rank: int, world: int, mode: str, dtype: str, backend: str, seq: int) -> dict:
    """On CUDA: the sequence split over ``world`` ranks vs one process. ``want``: one process in float32
    (plain autograd, the reference); ``base``: one process in ``dtype`` (plain autograd: that dtype's
    own error); ``got``: the split run in ``dtype``. fp32 parameters; bf16 by autocast."""
    torch.cuda.set_device(0)
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=256, num_layers=2, d_model=128, num_heads=4, num_kv_heads=2,
                            max_seq_len=seq, attention_backend=backend)
    model = ReversibleTransformer(cfg).cuda()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (1, seq), generator=g).cuda()

    def run(m, policy, low_precision):
        m.blocks.set_policy(policy)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=low_precision and dtype == "bfloat16"):
            loss = m(ids).loss
        loss.backward()
        return {"loss": loss.detach().cpu(), "grads": {n: v.cpu() for n, v in grads(m).items()}}

    want = run(copy.deepcopy(model), "store", low_precision=False)
    base = run(copy.deepcopy(model), "store", low_precision=True)
    sp = enable_sequence_parallel(model, mode=mode)
    got = run(model, "recompute", low_precision=True)
    average_gradients(model, sp)
    got["grads"] = {n: v.cpu() for n, v in grads(model).items()}
    return {**got, "want": want, "base": base}
