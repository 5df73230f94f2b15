"""GPU diagnosis: are a block's sub-functions deterministic and the same with and without grad,
and how far do the rebuilt streams drift, block by block (model S, bf16 autocast)."""
import dataclasses

import torch

from revnet_zero.models import ReversibleGPT, TransformerConfig


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(layers=4, seq=8192):
    torch.manual_seed(0)
    model = ReversibleGPT(dataclasses.replace(TransformerConfig.preset("S"), num_layers=layers)).cuda()
    ids = torch.randint(0, 32000, (1, seq), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x = (model.embed(ids) * model.config.embed_scale).float()
        c = model.blocks.blocks[0].coupling
        with torch.no_grad():
            a, b = c.f(x), c.f(x)
        xg = x.detach().requires_grad_()
        hg = c.f(xg)
        print(f"f twice, no grad: bitwise {torch.equal(a, b)}; no grad vs grad: bitwise {torch.equal(a, hg)} "
              f"rel {rel(hg, a):.2e}")
        with torch.no_grad():
            ga, gb = c.g(x), c.g(x)
        gg = c.g(xg)
        print(f"g twice, no grad: bitwise {torch.equal(ga, gb)}; no grad vs grad: bitwise {torch.equal(ga, gg)}")
        ins = []
        hooks = [blk.register_forward_pre_hook(lambda m, args: ins.append((args[0].clone(), args[1].clone())))
                 for blk in model.blocks.blocks]
        with torch.no_grad():
            y = model.blocks(x)
        for h in hooks:
            h.remove()
        s1, s2 = y
        for i in reversed(range(layers)):
            s1, s2 = model.blocks.blocks[i].inverse(s1, s2)
            print(f"block {i}: rebuilt input drift x1 {rel(s1, ins[i][0]):.2e} x2 {rel(s2, ins[i][1]):.2e}; "
                  f"|x1| {ins[i][0].norm():.3e}")


if __name__ == "__main__":
    main()
