"""The examples at tiny sizes on CPU: they run, learn, measure what they say, and refuse what cannot run
offline. GPU sizes are the same code with other flags."""
import copy
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from revnet_zero.examples import LongContextPretraining
from revnet_zero.research import MemoryEfficientResearch

ROOT = Path(__file__).resolve().parents[1]


def test_pretraining_learns_and_reversible_keeps_less():
    run = LongContextPretraining(model_size="tiny", context_length=64, batch_size=2, max_chars=60_000,
                                 learning_rate=3e-3)
    summary = run.run(steps=8)
    # byte-level text from random init: 8 steps of AdamW at 3e-3 take the loss well below ln(259) = 5.56
    assert summary["loss_last"] < summary["loss_first"] - 0.5, summary["losses"]
    mem = summary["activation_memory"]
    assert mem["measure"] == "saved_tensors" and 0 < mem["reversible"] < mem["standard"]
    assert summary["steps"] == 8 and summary["tokens_per_s"] > 0


@pytest.mark.parametrize("bad, match", [({"dataset": "openwebtext"}, "stdlib"), ({"model_size": "huge"}, "tiny"),
                                        ({"context_length": 0}, "context_length"),
                                        ({"dataset": "/no/such/folder"}, "existing")])
def test_pretraining_refuses_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        LongContextPretraining(**bad)


def test_document_qa_converts_exactly_learns_the_answer_format_and_scores():
    pytest.importorskip("transformers")
    from revnet_zero.examples import DocumentQA
    from revnet_zero.examples.document_qa import build_model, exact_match, make_documents

    torch.manual_seed(0)
    original = build_model("gpt2", "tiny", 192, 259).eval()
    qa = DocumentQA(model=copy.deepcopy(original), context_length=192, batch_size=4, facts_per_document=2)
    doc, question, answer = make_documents(1, 192, 2, seed=5)[0]
    assert f"is {answer}." in doc and question.startswith("Q: What is the code of room")
    # eval mode: the converted model is the original one, so the greedy answers are the same
    ids = torch.tensor([qa._encode(doc, question, "")[0]])
    with torch.no_grad():
        assert torch.equal(qa.model.eval()(input_ids=ids).logits, original(input_ids=ids).logits)
    losses = qa.finetune(steps=8)
    # the loss is on the answer bytes only: it falls from ln(259) towards ln(10) as the model learns digits
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses
    result = qa.evaluate(num_documents=3)
    assert result["documents"] == 3 and 0.0 <= result["exact_match"] <= 1.0
    assert exact_match(["0123", " 42 "], ["0123", "43"]) == 0.5


def test_document_qa_refuses_online_datasets_and_small_vocabularies():
    pytest.importorskip("transformers")
    from revnet_zero.examples import DocumentQA
    from revnet_zero.examples.document_qa import build_model
    with pytest.raises(ValueError, match="synthetic"):
        DocumentQA(dataset="squad")
    with pytest.raises(ValueError, match="259"):
        DocumentQA(model=build_model("llama", "tiny", 128, 100), context_length=128)


def test_memory_research_finds_depth_independence_and_orders_the_policies(tmp_path):
    study = MemoryEfficientResearch(model_size="tiny", seq_length=32)
    laws = study.test_scaling_laws(seq_lengths=[16, 32], num_layers=[1, 2])
    assert laws["measure"] == "saved_tensors" and len(laws["rows"]) == 4
    # counted exactly on CPU: a reversible block adds nothing per layer, a stored one adds its activations
    assert laws["bytes_per_layer"]["reversible"] == 0 < laws["bytes_per_layer"]["standard"]
    assert 0 < laws["bytes_per_token"]["reversible"] < laws["bytes_per_token"]["standard"]
    kept = {r["policy"]: r["kept_bytes"] for r in study.compare_policies(num_layers=2)}
    assert kept["recompute"] == 0 < kept["store_attention"] == kept["offload_attention"] < kept["store"]
    if importlib.util.find_spec("matplotlib"):
        assert study.plot(laws, tmp_path / "laws.png").stat().st_size > 0


@pytest.mark.parametrize("script", ["long_context_pretraining", "document_qa", "memory_research"])
def test_example_scripts_parse_their_gpu_flags(script):
    spec = importlib.util.spec_from_file_location(f"example_{script}", ROOT / "examples" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--device", "cuda"])
    assert args.device == "cuda" and callable(module.main)


@pytest.mark.parametrize("bad, match", [
    ({"learning_rate": float("inf")}, "learning_rate"), ({"learning_rate": True}, "learning_rate"),
    ({"batch_size": True}, "batch_size"), ({"precision": "fp8"}, "precision"),
    ({"dataset": ""}, "dataset"), ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed")])
def test_pretraining_config_refuses_what_it_used_to_take(bad, match):
    # each was accepted: lr=inf and precision='fp8' failed only after the corpus was read, dataset=''
    # read the working directory, True passed as a batch size of 1
    from revnet_zero.examples.pretraining import PretrainingConfig
    with pytest.raises(ValueError, match=match):
        PretrainingConfig(**bad)


@pytest.mark.parametrize("bad, match", [
    ({"learning_rate": float("inf")}, "learning_rate"), ({"learning_rate": -1.0}, "learning_rate"),
    ({"gamma0": 0.3}, "gamma0"), ({"batch_size": True}, "batch_size")])
def test_document_qa_config_refuses_what_it_used_to_take(bad, match):
    # lr=inf went to AdamW, which takes it and writes NaN weights; the rest failed late or not at all
    from revnet_zero.examples.document_qa import DocumentQAConfig
    with pytest.raises(ValueError, match=match):
        DocumentQAConfig(**bad)


@pytest.mark.parametrize("lengths, depths", [([64.5], [1]), (["64"], [1]), ([64], [True])])
def test_memory_research_refuses_lengths_and_depths_that_are_not_ints(lengths, depths):
    with pytest.raises(ValueError, match="ints"):
        MemoryEfficientResearch().test_scaling_laws(seq_lengths=lengths, num_layers=depths)


def test_document_qa_answers_about_a_document_longer_than_its_context():
    # the document fills the context, so each generated byte made the input one longer than GPT-2's
    # position table: "IndexError: index out of range in self" at the second byte
    pytest.importorskip("transformers")
    from revnet_zero.examples import DocumentQA
    torch.manual_seed(0)
    qa = DocumentQA(context_length=128, model_size="tiny")
    answer = qa.answer_question("The code of room 7 is 1234. " * 40, "Q: What is the code of room 7? A: ",
                                max_new_bytes=4)
    assert isinstance(answer, str) and len(answer) <= 4   # at most one character per generated byte


def test_pretraining_on_a_folder_without_text_names_the_folder(tmp_path):
    # it raised "from_texts got no texts", which named neither the dataset nor what it should hold
    (tmp_path / "data.bin").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match="holds no readable text"):
        LongContextPretraining(dataset=str(tmp_path)).run(steps=1)


def test_memory_research_script_gives_a_usage_error_for_a_bad_list(capsys):
    # was: ValueError: invalid literal for int() with base 10: 'abc' (a traceback)
    import runpy
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "memory_research.py")
    parse_args = runpy.run_path(script)["parse_args"]
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--seq-lengths", "64,abc"])
    assert exit_info.value.code == 2 and "expected comma-separated integers, got '64,abc'" in capsys.readouterr().err
