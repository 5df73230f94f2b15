"""Runner 'alst': Snowflake's ALST recipe, run by ``arctic-training`` (its CLI and DeepSpeed launcher) on one GPU.

ALST on one GPU is: tiled MLP compute, Liger's fused logits + loss (``model.type: liger``),
activation checkpoints offloaded to the host, and DeepSpeed ZeRO-3 (optimizer states offloaded to the
host for full-parameter training). This runner writes what arctic-training needs for our shape and
data, all local: the random-init model saved in bf16, a word-level tokenizer whose word ``<i>`` is
token ``i`` (so the text ``"<5> <77> ..."`` is the same token ids as the other runners'), the text as a
``datasets`` dataset on disk, and the recipe (a YAML file); then launches ``arctic_training RECIPE
--num_gpus 1`` and reads its per-iteration log (``train-log-metrics.jsonl``). With ``--memory-cap-gib``
DeepSpeed's launcher starts ``alst_capped`` (the cap, then arctic-training's own rank entry point)
instead, as arctic-training's CLI would start ``arctic_training_run``. Peak GPU memory is
sampled from NVML (the whole process: context and allocator cache included); pinned host memory
is not reported by arctic-training (recorded as None).

Needs ``arctic-training`` and ``deepspeed`` (pip install arctic-training deepspeed; arctic-training 0.8
declares transformers<5 but imports with 5.x), a GPU, and ``nvidia-ml-py``.

    python -m revnet_zero.benchmarks.finetune_alst --shape llama-3.1-8b --method lora --lengths 32768 --out $OUT
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time

import torch

from .finetune import LORA_TARGETS, Run, build_model, main, tokens
from .gpu_sampler import PeakSampler


def _options(p) -> None:
    p.add_argument("--work", default=None, help="folder for the model, data and recipe (default: a temporary one)")
    p.add_argument("--recipe-only", action="store_true", help="write the files and print the command; run nothing")


def tokenizer(vocab: int):
    """A fast word-level tokenizer: word ``<i>`` is token ``i`` (delimited, so the special tokens ``<0>`` and
    ``<1>`` never match inside another word, as ``t1`` would inside ``t172``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab)}, unk_token="<0>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<0>", pad_token="<0>", eos_token="<1>",
                                   bos_token="<1>")


def recipe(run: Run, model_dir: str, data_dir: str, out_dir: str) -> dict:
    """The arctic-training recipe for ``run`` (steps: one warm-up and ``run.steps`` timed iterations)."""
    zero = {"stage": 3}
    if run.method == "full":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    model = {"type": "liger", "name_or_path": model_dir, "dtype": "bf16", "attn_implementation": "sdpa"}
    if run.method in ("lora", "qlora"):
        model["peft_config"] = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                                "target_modules": LORA_TARGETS}
    return {
        "type": "causal", "micro_batch_size": 1, "sequence_parallel_size": 1, "train_iters": run.steps + 1,
        "activation_checkpoint_cpu_offload": True, "tiled_mlp_compute": True,
        "train_log_metrics_path": os.path.join(out_dir, "train-log-metrics.jsonl"),
        "model": model, "deepspeed": {"zero_optimization": zero},
        "optimizer": {"type": "cpu_adam" if run.method == "full" else "fused_adam", "learning_rate": 1e-5},
        "data": {"type": "causal", "max_length": run.length, "cache_dir": os.path.join(out_dir, "cache"),
                 "sources": [{"type": "huggingface_causal", "name_or_path": data_dir}]},
        "logger": {"output_dir": out_dir},
    }


def command(path: str, cap_gib: float | None) -> list[str]:
    if cap_gib is None:
        return ["arctic_training", path, "--num_gpus", "1"]
    return ["deepspeed", "--num_gpus", "1", "--module", "revnet_zero.benchmarks.alst_capped", "--mode", "train",
            "--config", path, "--python_profile", "disable"]


def prepare(run: Run, work: str) -> tuple[str, list[str]]:
    """Write the model, tokenizer, data and recipe under ``work``; the recipe path and the command."""
    import datasets
    if run.method == "qlora":
        raise ValueError("arctic-training's recipes have no 4-bit base weights; method 'qlora' is ours and hf only")
    model_dir, data_dir, out_dir = (os.path.join(work, n) for n in ("model", "data", "out"))
    cpu_run = Run(**{**run.__dict__, "device": "cpu", "method": "lora"})   # plain weights, saved from the host
    model = build_model(cpu_run)
    model.save_pretrained(model_dir)
    tokenizer(model.config.vocab_size).save_pretrained(model_dir)
    ids = tokens(cpu_run, model.config.vocab_size)[0].tolist()
    text = " ".join(f"<{i}>" for i in ids)
    datasets.Dataset.from_dict({"text": [text] * (run.steps + 1)}).save_to_disk(data_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(work, "recipe.yaml")
    with open(path, "w") as f:
        json.dump(recipe(run, model_dir, data_dir, out_dir), f, indent=1)   # JSON is YAML
    return path, command(path, run.memory_cap_gib)


def run_one(run: Run, a) -> dict:
    work = a.work or tempfile.mkdtemp(prefix="alst_")
    path, cmd = prepare(run, work)
    row = {**run.__dict__, "recipe": path, "command": " ".join(cmd)}
    if a.recipe_only:
        return {**row, "status": "recipe-only"}
    if shutil.which(cmd[0]) is None:
        return {**row, "status": "error", "error": "arctic_training is not installed (pip install arctic-training)"}
    sampler = PeakSampler()
    env = dict(os.environ)
    if run.memory_cap_gib is not None:
        env["REVNET_MEMORY_CAP_GIB"] = str(run.memory_cap_gib)
    t0 = time.perf_counter()
    with sampler:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    row.update(wall_s=time.perf_counter() - t0, peak_gpu_nvml_gib=sampler.peak_gib, pinned_host_gib=None)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout)[-2000:]
        status = "oom" if "out of memory" in tail.lower() else "error"
        return {**row, "status": status, "error": tail[-500:]}
    iters = _iterations(os.path.join(work, "out", "train-log-metrics.jsonl"))
    timed = [it["iter_time"] for it in iters[1:] if "iter_time" in it]   # the first is the warm-up
    if not timed:
        return {**row, "status": "error", "error": f"no timed iterations in arctic-training's log: {iters!r}"[:500]}
    step_s = sorted(timed)[len(timed) // 2]
    return {**row, "status": "ok", "step_s": step_s, "step_times_s": timed, "tokens_per_s": run.length / step_s,
            "losses": [it.get("loss") for it in iters]}


def _iterations(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


if __name__ == "__main__":
    torch.manual_seed(0)
    main("alst", run_one, extra=_options)
