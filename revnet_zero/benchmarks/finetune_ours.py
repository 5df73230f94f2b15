"""Runner 'ours': the model converted with ``convert_to_reversible`` (BDIA, exact), trained at long context.

LoRA / QLoRA: adapters on q/k/v/o, AdamW on them after backward. Full-parameter: every weight,
bitsandbytes' 8-bit AdamW stepped inside the backward (``OptimizerInBackward``: each layer's
gradients exist only while that layer is differentiated; 2 bytes of state per parameter).
The loss is the chunked head + cross-entropy on the last hidden state (the logits never exist whole).

    python -m revnet_zero.benchmarks.finetune_ours --shape llama-3.1-8b --method lora \
        --lengths 32768,131072,524288 --offload --mlp-chunk 16384 --memory-cap-gib 78.4 --out $OUT
"""
from __future__ import annotations

import torch

from ..conversion import convert_to_reversible
from ..ops.loss import fused_linear_cross_entropy
from ..training.in_backward import OptimizerInBackward
from .finetune import Run, add_lora, build_model, eight_bit_adamw, main, measure, tokens


def _options(p) -> None:
    p.add_argument("--gamma0", type=float, default=0.125, help="BDIA's gamma0 (1/2, 1/4, 1/8)")
    p.add_argument("--offload", action="store_true", help="grid tensors and kept bits in pinned host memory")
    p.add_argument("--mlp-chunk", type=int, default=None, help="positions per MLP tile in training")


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    h = base.model(input_ids=ids).last_hidden_state
    targets = torch.cat([ids[:, 1:], ids.new_full((ids.shape[0], 1), -100)], dim=1)
    return fused_linear_cross_entropy(h.reshape(-1, h.shape[-1]), base.lm_head.weight, targets.reshape(-1))


def run_one(run: Run, a) -> dict:
    model = convert_to_reversible(build_model(run), gamma0=a.gamma0, inplace=True, verbose=False,
                                  offload=a.offload, mlp_chunk_size=a.mlp_chunk)
    if run.method == "full":
        optimizer = OptimizerInBackward(model.parameters(), eight_bit_adamw(), lr=1e-5)
        after = None
    else:
        model = add_lora(model)
        optimizer = None
        after = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    ids = tokens(run, model.config.vocab_size)

    def step() -> float:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16):
            loss = loss_of(model, ids)
        loss.backward()   # with OptimizerInBackward the weights are updated during this call
        if after is not None:
            after.step()
            after.zero_grad(set_to_none=True)
        return loss.item()

    row = measure(run, step)
    row.update(gamma0=a.gamma0, offload=a.offload, mlp_chunk=a.mlp_chunk,
               optimizer_state_gib=(optimizer.state_bytes() / 2 ** 30 if optimizer is not None else None))
    return row


if __name__ == "__main__":
    main("ours", run_one, extra=_options)
