"""What is alive at the peak of one training step: a device-free memory tracer for development.

Every tensor an aten op returns is counted under its storage until the last Python tensor on that
storage dies (PyTorch keeps a tensor's Python object alive while C++, e.g. autograd, still holds it).
Parameters, the batch and anything allocated before the step are left out, and so are workspaces
inside kernels: the figure is the step's own tensor memory, which on CUDA is
``max_memory_allocated - allocated before`` up to the caching allocator's rounding. The CPU run
takes the same code path as CUDA except attention (CPU: no cuDNN kernel, no contiguous copies).

    python -m benchmarks.memory_breakdown --d-model 1024 --layers 2 --seq 4096 --top 25

To see at a short length what dominates at a long one, shrink the tiles in proportion
(``--ffn-chunk``, ``--norm-rows``: 1024 at 8k tokens stands for 16384 at 128k).

Prints the peak in bytes per token and the tensors alive at the peak, largest first.
"""
from __future__ import annotations

import argparse
import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensors(TorchDispatchMode):
    """Tracks the bytes of storages created by aten ops while active; records the set alive at the peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[int, str]] = {}
        self.refs: Counter = Counter()
        self.current = self.peak = 0
        self.at_peak: list[tuple[int, str]] = []
        self.where = "?"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t, func)
        return out

    def _track(self, t: torch.Tensor, func) -> None:
        st = t.untyped_storage()
        key, nbytes = st.data_ptr(), st.nbytes()
        if nbytes == 0:
            return
        if key not in self.live:
            self.live[key] = (nbytes, f"{self.where}: {func.__name__} {tuple(t.shape)} {t.dtype}")
            self.current += nbytes
            if self.current > self.peak:
                self.peak = self.current
                self.at_peak = list(self.live.values())
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.current -= self.live.pop(key)[0]


def main(argv=None) -> None:
    from revnet_zero import engine
    from revnet_zero.models import ReversibleTransformer, TransformerConfig
    from revnet_zero.ops import norm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--policy", default="recompute")
    p.add_argument("--ffn-chunk", type=int, default=16384)
    p.add_argument("--loss-chunk", type=int, default=4096)
    p.add_argument("--norm-rows", type=int, default=None, help="rows per chunk of the fused RMSNorm")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if a.norm_rows:
        norm.ROWS = a.norm_rows
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=a.vocab, num_layers=a.layers, d_model=a.d_model, num_heads=a.heads,
                            max_seq_len=a.seq, ffn_chunk_size=a.ffn_chunk, loss_chunk_size=a.loss_chunk)
    dev = torch.device(a.device)
    model = ReversibleTransformer(cfg).to(dev)
    model.blocks.set_policy(a.policy)
    ids = torch.randint(0, a.vocab, (1, a.seq), device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    tracer = LiveTensors()
    # Name the block that allocates, without module hooks (they would change the engine's path).
    block_forward, reverse = engine.ReversibleBlock.forward, engine._reverse_steps
    index = {id(b): i for i, b in enumerate(model.blocks.blocks)}

    def traced_forward(self, *args, **kwargs):
        tracer.where = f"fwd block {index.get(id(self), '?')}"
        return block_forward(self, *args, **kwargs)

    def traced_reverse(ctx, *args):
        tracer.where = f"bwd block {ctx.index}"
        return reverse(ctx, *args)

    engine.ReversibleBlock.forward = traced_forward
    model.norm.register_forward_pre_hook(lambda m, args: setattr(tracer, "where", "head/loss"))
    engine._reverse_steps = traced_reverse
    with tracer:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = model(ids).loss
        tracer.where = "backward"
        loss.backward()
    per_token = tracer.peak / a.seq
    if dev.type == "cuda":
        alloc = torch.cuda.max_memory_allocated() - before
        print(f"CUDA allocator: max_memory_allocated - before = {alloc / 2**20:.1f} MiB "
              f"({alloc / a.seq / 1024:.2f} KiB/token, parameter gradients included)")
    stream = a.seq * a.d_model * 4
    print(f"peak {tracer.peak / 2**20:.1f} MiB = {per_token / 1024:.2f} KiB/token = "
          f"{tracer.peak / stream:.2f} float32 streams; alive at the peak:")
    for nbytes, what in sorted(tracer.at_peak, reverse=True)[:a.top]:
        print(f"  {nbytes / stream:6.3f} streams  {what}")


if __name__ == "__main__":
    main()
