"""Run a test worker in several spawned processes joined by a gloo process group.

Each rank calls ``<module>.<worker>(rank, world, **kwargs)`` and saves its result; a rank's traceback
comes back in the AssertionError, and hung ranks are killed after a deadline.
"""
from __future__ import annotations

import datetime
import importlib
import os
import socket
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GLOO_TIMEOUT_S = 60    # a collective that waits longer than this fails instead of hanging
JOIN_TIMEOUT_S = 100   # the whole run; far above the slowest test (about 20 s on a busy 2-core machine)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, module: str, worker: str, kwargs: dict, outdir: str,
           pg_backend: str = "gloo") -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(pg_backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
        try:
            result = getattr(importlib.import_module(module), worker)(rank, world, **kwargs)
        finally:
            dist.destroy_process_group()
        torch.save(result, os.path.join(outdir, f"{rank}.pt"))
        # Result saved, process group destroyed: leave without the interpreter's teardown, where torch's
        # static destructors now and then abort the process (SIGABRT, "terminate called without an
        # active exception"; measured 2 to 3 runs in 30 of a 2-rank gloo worker, the same before the ring
        # existed) and fail a test whose every rank had already finished and saved.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    except BaseException:
        with open(os.path.join(outdir, f"{rank}.err"), "w") as fh:
            fh.write(traceback.format_exc())
        raise SystemExit(1) from None  # the traceback travels in the .err file, not on stderr


def run_workers(module: str, worker: str, world: int, pg_backend: str = "gloo", **kwargs) -> list:
    """Run ``module.worker(rank, world, **kwargs)`` in ``world`` spawned processes; each rank's result.
    ``pg_backend``: the process group's backend (``'nccl'`` for one rank per GPU)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as outdir:
        procs = [ctx.Process(target=_entry, args=(r, world, port, module, worker, kwargs, outdir, pg_backend))
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join()
        errors = []
        for r in range(world):
            err = os.path.join(outdir, f"{r}.err")
            if os.path.exists(err):
                with open(err) as fh:
                    errors.append(f"--- rank {r} ---\n{fh.read()}")
        if errors or hung or any(p.exitcode != 0 for p in procs):
            raise AssertionError(f"{worker} failed (exit codes {[p.exitcode for p in procs]}, "
                                 f"hung ranks {hung}):\n" + "\n".join(errors))
        return [torch.load(os.path.join(outdir, f"{r}.pt")) for r in range(world)]
