"""GPU diagnosis: reversible vs plain-autograd gradients of model S per SDPA back end and dtype.

python -m benchmarks.diagnose_grads --layers 4 --seq 8192
"""
import argparse
import contextlib
import dataclasses

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from revnet_zero.models import ReversibleGPT, TransformerConfig


def grads(model, ids, policy, amp):
    model.blocks.set_policy(policy)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        loss = model(ids).loss
    names, params = zip(*[(n, p) for n, p in model.named_parameters()])
    g = torch.autograd.grad(loss, params)
    return loss.item(), dict(zip(names, g))


def worst(g, ref, k=3):
    errs = {n: ((g[n].float() - ref[n].float()).norm() / ref[n].float().norm()).item() for n in ref}
    top = sorted(errs.items(), key=lambda kv: -kv[1])[:k]
    return max(errs.values()), sorted(errs.values())[len(errs) // 2], top


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=8192)
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = dataclasses.replace(TransformerConfig.preset("S"), num_layers=a.layers)
    model = ReversibleGPT(cfg).cuda()
    ids = torch.randint(0, cfg.vocab_size, (1, a.seq), device="cuda")
    backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    for amp in (True, False):
        for bname, b in backends.items():
            if not amp and b is not None:
                continue  # the forced kernels take only half precision
            ctx = sdpa_kernel(b) if b is not None else contextlib.nullcontext()
            with ctx:
                l0, ref = grads(model, ids, "store", amp)
                _, ref2 = grads(model, ids, "store", amp)
                floor = worst(ref2, ref)
                print(f"amp={amp} sdpa={bname}: floor max {floor[0]:.2e} med {floor[1]:.2e}", flush=True)
                # conditioning: plain autograd again on an embedding scaled by (1 + eps), eps of the
                # order of the rebuilt streams' drift (float32: 1e-7; bf16 autocast: 1e-4)
                eps = 1e-4 if amp else 1e-7
                with torch.no_grad():
                    model.embed.weight.mul_(1 + eps)
                _, gp = grads(model, ids, "store", amp)
                with torch.no_grad():
                    model.embed.weight.div_(1 + eps)
                mx, med, top = worst(gp, ref)
                print(f"  {'perturbed ' + str(eps):16s} plain autograd: max {mx:.2e} med {med:.2e} "
                      + ", ".join(f"{n} {e:.1e}" for n, e in top), flush=True)
                for policy in ("recompute", "store_attention"):
                    loss, g = grads(model, ids, policy, amp)
                    mx, med, top = worst(g, ref)
                    print(f"  {policy:16s} loss {loss:.6f} vs {l0:.6f}: max {mx:.2e} med {med:.2e} "
                          + ", ".join(f"{n} {e:.1e}" for n, e in top), flush=True)


if __name__ == "__main__":
    main()
