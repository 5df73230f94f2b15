"""CPU smoke test of the long-context fine-tuning runners (revnet_zero.benchmarks.finetune*), tiny shape.

Our runner trains (LoRA and full-parameter) and writes its rows; the Hugging Face runner without its
GPU-only parts (Liger's Triton kernels, TRL's offloading, which needs an accelerator); the ALST runner
writes arctic-training's inputs, whose tokenizer gives back exactly the tokens the other runners
train on. No figure here is a measurement: speed and memory come from the GPU runs.
"""
import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from revnet_zero.benchmarks import finetune, finetune_alst, finetune_hf, finetune_ours  # noqa: E402

TINY = ["--shape", "tiny", "--lengths", "32", "--device", "cpu", "--steps", "1"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_our_runner_trains_and_writes_rows(method, tmp_path):
    (row,) = finetune_ours.main("ours", finetune_ours.run_one, TINY + ["--method", method, "--out", str(tmp_path)],
                                extra=finetune_ours._options)
    assert row["status"] == "ok" and row["tokens_per_s"] > 0 and all(math.isfinite(x) for x in row["losses"])
    if method == "full":
        assert row["optimizer_state_gib"] > 0   # 8-bit AdamW states exist, stepped inside backward
    (line,) = (tmp_path / "finetune_ours.jsonl").read_text().splitlines()
    saved = json.loads(line)
    assert saved["length"] == 32 and saved["versions"]["torch"] == torch.__version__


def test_hf_runner_without_its_gpu_parts(tmp_path):
    (row,) = finetune_hf.main("hf", finetune_hf.run_one,
                              TINY + ["--method", "lora", "--no-liger", "--no-offload", "--out", str(tmp_path)],
                              extra=finetune_hf._options)
    assert row["status"] == "ok" and math.isfinite(row["losses"][0])


def test_alst_runner_writes_the_recipe_on_the_same_tokens(tmp_path):
    datasets = pytest.importorskip("datasets")
    (row,) = finetune_alst.main("alst", finetune_alst.run_one,
                                TINY + ["--method", "full", "--recipe-only", "--work", str(tmp_path / "w"),
                                        "--out", str(tmp_path)], extra=finetune_alst._options)
    assert row["status"] == "recipe-only" and row["command"].startswith("arctic_training ")
    recipe = json.loads((tmp_path / "w" / "recipe.yaml").read_text())
    assert recipe["tiled_mlp_compute"] and recipe["activation_checkpoint_cpu_offload"]
    assert recipe["model"]["type"] == "liger" and recipe["data"]["max_length"] == 32
    assert recipe["deepspeed"]["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu",
                                                                                          "pin_memory": True}}
    text = datasets.load_from_disk(str(tmp_path / "w" / "data"))["text"][0]
    run = finetune.Run(runner="alst", shape="tiny", method="full", length=32, device="cpu")
    ids = finetune_alst.tokenizer(256)(text, add_special_tokens=False)["input_ids"]
    assert ids == finetune.tokens(run, 256)[0].tolist()


def test_alst_under_a_cap_starts_the_capped_entry_point():
    assert finetune_alst.command("r.yaml", None) == ["arctic_training", "r.yaml", "--num_gpus", "1"]
    capped = finetune_alst.command("r.yaml", 78.4)
    assert capped[:5] == ["deepspeed", "--num_gpus", "1", "--module", "revnet_zero.benchmarks.alst_capped"]
    assert capped[capped.index("--config") + 1] == "r.yaml"


def test_search_bisects_on_fresh_processes(tmp_path, monkeypatch):
    """The longest-length search, with each probe's result faked: lengths up to 96 'train'."""
    calls = []

    def fake(cmd, capture_output, text):
        length = int(cmd[cmd.index("--lengths") + 1])
        calls.append(length)
        status = "ok" if length <= 96 else "oom"
        return type("Done", (), {"returncode": 0, "stdout": json.dumps({"status": status}) + "\n"})()

    monkeypatch.setattr(finetune.subprocess, "run", fake)
    (row,) = finetune.main("ours", finetune_ours.run_one, ["--shape", "tiny", "--search", "32,256", "--granularity",
                                                          "32", "--device", "cpu", "--out", str(tmp_path)],
                           extra=finetune_ours._options)
    assert row["longest"] == 96 and len(calls) <= 4


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="method must be one of .*got 'dora'"):
        finetune.Run(runner="ours", shape="tiny", method="dora", length=8)
    with pytest.raises(ValueError, match="shape must be one of .*got 'llama-9b'"):
        finetune.Run(runner="ours", shape="llama-9b", method="lora", length=8)
    with pytest.raises(ValueError, match="length must be a positive int, got 0"):
        finetune.Run(runner="ours", shape="tiny", method="lora", length=0)


@pytest.mark.parametrize("shape", ["llama-3.1-8b", "qwen3-8b"])
def test_the_8b_configs_are_the_published_shapes(shape):
    config = finetune.model_config(finetune.Run(runner="ours", shape=shape, method="lora", length=131072))
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (4096, 32, 8)
    assert (config.intermediate_size, config.num_hidden_layers) == {"llama-3.1-8b": (14336, 32),
                                                                   "qwen3-8b": (12288, 36)}[shape]
    assert config.max_position_embeddings >= 131072 and config.use_cache is False
