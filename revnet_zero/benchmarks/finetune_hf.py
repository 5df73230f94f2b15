"""Runner 'hf': Hugging Face gradient checkpointing, activations offloaded to pinned host memory, Liger kernels.

What a user of transformers + TRL + Liger runs for long context today: every decoder layer
checkpointed (``gradient_checkpointing_enable``, non-reentrant), the tensors each checkpoint keeps
offloaded to pinned host memory by TRL's ``get_act_offloading_ctx_manager`` (its
``activation_offloading=True``), and Liger's Triton kernels patched into the model (RMSNorm, RoPE,
SwiGLU, fused linear cross-entropy: the logits never exist whole). LoRA / QLoRA: AdamW on the
adapters; full-parameter: bitsandbytes' 8-bit AdamW stepped after backward (the same optimizer as
'ours', which steps it inside backward instead).

    python -m revnet_zero.benchmarks.finetune_hf --shape llama-3.1-8b --method lora --lengths 32768,131072 \
        --memory-cap-gib 78.4 --out $OUT
"""
from __future__ import annotations

import contextlib

import torch

from .finetune import Run, add_lora, build_model, eight_bit_adamw, main, measure, tokens


def _options(p) -> None:
    p.add_argument("--no-liger", action="store_true", help="leave Liger's kernels out (CPU smoke runs: Triton)")
    p.add_argument("--no-offload", action="store_true", help="keep the checkpoints on the GPU")


def _liger(model) -> None:
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as e:
        raise ImportError("runner 'hf' uses Liger kernels (pip install liger-kernel), or pass --no-liger") from e
    _apply_liger_kernel_to_instance(model=model)


def _offloading(model, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    try:
        from trl.models.activation_offloading import get_act_offloading_ctx_manager
    except ImportError as e:
        raise ImportError("runner 'hf' offloads checkpoints with TRL's activation offloading (pip install trl), "
                          "or pass --no-offload") from e
    return get_act_offloading_ctx_manager(model, warn_if_no_head=False)


def run_one(run: Run, a) -> dict:
    model = build_model(run)
    if not a.no_liger:
        _liger(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if run.method == "full":
        optimizer = eight_bit_adamw()(model.parameters(), lr=1e-5)
    else:
        model = add_lora(model)
        model.enable_input_require_grads()   # checkpointed layers need an input that requires grad
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    ids = tokens(run, model.config.vocab_size)
    offload = _offloading(model, not a.no_offload)

    def step() -> float:
        with offload, torch.autocast(ids.device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    row = measure(run, step)
    row.update(liger=not a.no_liger, offload=not a.no_offload)
    return row


if __name__ == "__main__":
    main("hf", run_one, extra=_options)
