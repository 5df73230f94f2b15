"""Document question answering with a converted pretrained-architecture model.

A Hugging Face GPT-2 or Llama model is converted with ``convert_to_reversible`` (BDIA: the eval model is the
original one, training keeps no per-layer activations), fine-tuned on long documents that each hide a few
facts, with a question whose answer is one of them, and evaluated by exact match of the greedy answer.
By default the model is built from its ``transformers`` config with random weights and the documents are
synthetic, so nothing is downloaded; pass ``model=`` (e.g. ``from_pretrained(...)``) and ``documents=`` to
use real ones. Tokens are bytes (``ByteTokenizer``), so any model needs a vocabulary of at least 259.
"""
from __future__ import annotations

import dataclasses
import math
import random

import torch
from torch import nn

from ..conversion import convert_to_reversible
from ..data import ByteTokenizer

REMOTE_DATASETS = {"squad", "narrativeqa", "triviaqa", "natural_questions", "hotpotqa", "quality", "qasper"}
ARCHITECTURES = ("gpt2", "llama")
# (layers, width, heads) per size; the configs are built here, the weights are random
SIZES = {"tiny": (2, 64, 4), "small": (6, 256, 8), "base": (12, 768, 12)}
FILLER = ("The committee met again to review the schedule. ", "Several notes were filed without comment. ",
          "Nothing else of interest happened that day. ", "The weather stayed mild and the roads were clear. ")


@dataclasses.dataclass
class DocumentQAConfig:
    architecture: str = "gpt2"           # 'gpt2' or 'llama': the transformers model class to build
    model_size: str = "tiny"             # 'tiny', 'small', 'base' (see SIZES); ignored when a model is given
    context_length: int = 512            # bytes per document, question and answer included
    batch_size: int = 4                  # documents per fine-tuning step
    facts_per_document: int = 4          # facts hidden in each document; the question asks about one
    learning_rate: float = 3e-3          # AdamW learning rate
    gamma0: float = 0.5                  # BDIA's gamma: 1/2, 1/4 or 1/8
    dataset: str = "synthetic"           # 'synthetic' (generated here); online QA sets are refused
    device: str | None = None            # None: cuda if available, else cpu
    seed: int = 0                        # weights, documents, fine-tuning order

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.model_size not in SIZES:
            raise ValueError(f"model_size must be one of {sorted(SIZES)}, got {self.model_size!r}")
        for name in ("context_length", "batch_size", "facts_per_document"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        # AdamW takes lr=inf and writes NaN weights: refuse it here
        if (isinstance(self.learning_rate, bool) or not isinstance(self.learning_rate, (int, float))
                or not 0 < self.learning_rate < math.inf):
            raise ValueError(f"learning_rate must be a positive finite number, got {self.learning_rate!r}")
        if self.gamma0 not in (0.5, 0.25, 0.125):
            raise ValueError(f"gamma0 must be 1/2, 1/4 or 1/8, got {self.gamma0!r}")
        if self.context_length < 128:
            raise ValueError(f"context_length must be at least 128 bytes (a question and its facts), "
                             f"got {self.context_length}")
        if self.dataset.lower() in REMOTE_DATASETS:
            raise ValueError(f"dataset={self.dataset!r} would be downloaded, which this example does not do; "
                             "use dataset='synthetic', or pass your own documents=[(document, question, answer)]")
        if self.dataset != "synthetic":
            raise ValueError(f"dataset must be 'synthetic' (or pass documents=...), got {self.dataset!r}")


def make_documents(n: int, length: int, facts: int, seed: int) -> list[tuple[str, str, str]]:
    """``n`` (document, question, answer) triples. A document is filler sentences with ``facts`` sentences
    "The code of room R is DDDD." at random places, at most ``length - 48`` bytes in all (the question and
    answer take the rest); the question asks for one room's code."""
    budget = length - 48 - facts * len("The code of room 000 is 0000. ")
    if budget < 0:
        raise ValueError(f"context_length={length} cannot hold {facts} facts and a question; use a longer "
                         f"context or fewer facts_per_document")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        rooms = rng.sample(range(100, 1000), facts)
        codes = [f"{rng.randrange(10000):04d}" for _ in rooms]
        sentences, used = [], 0
        while True:
            s = rng.choice(FILLER)
            if used + len(s) > budget:
                break
            sentences.append(s)
            used += len(s)
        for room, code in zip(rooms, codes):
            sentences.insert(rng.randrange(len(sentences) + 1), f"The code of room {room} is {code}. ")
        k = rng.randrange(facts)
        out.append(("".join(sentences), f"Q: What is the code of room {rooms[k]}? A: ", codes[k]))
    return out


def exact_match(predictions: list[str], answers: list[str]) -> float:
    """The fraction of predictions equal to their answers after stripping whitespace."""
    if len(predictions) != len(answers) or not answers:
        raise ValueError(f"need as many predictions as answers (and at least one), got {len(predictions)} "
                         f"and {len(answers)}")
    return sum(p.strip() == a.strip() for p, a in zip(predictions, answers)) / len(answers)


def build_model(architecture: str, size: str, context_length: int, vocab_size: int) -> nn.Module:
    """A randomly initialised transformers causal LM of ``architecture`` at ``size`` (no download)."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("DocumentQA needs transformers: pip install 'revnet-zero[hf]'") from e
    layers, width, heads = SIZES[size]
    if architecture == "gpt2":
        config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab_size,
                                         n_positions=context_length, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads,
                                      num_key_value_heads=max(1, heads // 2), intermediate_size=4 * width,
                                      vocab_size=vocab_size, max_position_embeddings=context_length,
                                      bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(config)


class DocumentQA:
    """Convert, fine-tune on long documents with questions, evaluate by exact match.

    ``model``: a transformers GPT-2 / Llama-family causal LM to convert (default: one built from its config
    at ``model_size``, random weights). ``documents``: your own ``(document, question, answer)`` triples for
    ``finetune`` (default: synthetic ones). Other keyword arguments are the fields of ``DocumentQAConfig``.

    Example::

        qa = DocumentQA(architecture="gpt2", model_size="tiny", context_length=512)
        losses = qa.finetune(steps=30)
        print(qa.evaluate(num_documents=16))            # {'exact_match': ..., 'documents': 16}
        print(qa.answer_question(document, "Q: What is the code of room 123? A: "))
    """

    def __init__(self, model: nn.Module | None = None, documents: list[tuple[str, str, str]] | None = None,
                 **options):
        self.config = c = DocumentQAConfig(**options)
        self.tokenizer = ByteTokenizer()
        self.device = torch.device(c.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(c.seed)
        if model is None:
            model = build_model(c.architecture, c.model_size, c.context_length, self.tokenizer.vocab_size)
        vocab = model.get_input_embeddings().num_embeddings
        if vocab < self.tokenizer.vocab_size:
            raise ValueError(f"the model's vocabulary has {vocab} tokens; byte tokens need at least "
                             f"{self.tokenizer.vocab_size}")
        self.model = convert_to_reversible(model, gamma0=c.gamma0, verbose=False).to(self.device)
        self.documents = documents
        self._draw = 0

    def _encode(self, doc: str, question: str, answer: str) -> tuple[list[int], int]:
        """Byte ids of the document (cut from the front to fit), question and answer; where the answer starts."""
        tail = self.tokenizer.encode(question) + self.tokenizer.encode(answer)
        room = self.config.context_length - len(tail)
        if room < 1:
            raise ValueError(f"question and answer take {len(tail)} bytes, more than context_length="
                             f"{self.config.context_length}")
        head = self.tokenizer.encode(doc)[-room:]
        return head + tail, len(head) + len(self.tokenizer.encode(question))

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ids and labels ``[B, S]``: the loss is on the answer bytes only (-100 elsewhere and on padding)."""
        c = self.config
        if self.documents is not None:
            triples = [self.documents[(self._draw + i) % len(self.documents)] for i in range(c.batch_size)]
        else:
            triples = make_documents(c.batch_size, c.context_length, c.facts_per_document, c.seed + 1 + self._draw)
        self._draw += c.batch_size
        rows = [self._encode(*t) for t in triples]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), 0, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        for i, (row, start) in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            labels[i, start:len(row)] = ids[i, start:len(row)]
        return ids.to(self.device), labels.to(self.device)

    def finetune(self, steps: int = 30) -> list[float]:
        """``steps`` AdamW steps on the answers; returns the loss of each step."""
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.config.learning_rate)
        self.model.train()
        losses = []
        for _ in range(steps):
            ids, labels = self._batch()
            loss = self.model(input_ids=ids, labels=labels).loss
            loss.backward()     # BDIA: each layer's inputs are rebuilt, none were kept
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    @torch.no_grad()
    def answer_question(self, document: str, question: str, max_new_bytes: int = 8) -> str:
        """The greedy answer to ``question`` about ``document``, up to ``max_new_bytes`` bytes (stops at '.'
        or a newline). Runs in eval mode, where the converted model computes the original one."""
        self.model.eval()
        ids, _ = self._encode(document, question, "")
        ids = torch.tensor([ids], device=self.device)
        out = []
        for _ in range(max_new_bytes):
            # the last context_length bytes: a long document already fills the context, and GPT-2's
            # position table ends there (a longer input raised IndexError)
            nxt = self.model(input_ids=ids[:, -self.config.context_length:]).logits[0, -1].argmax().item()
            if nxt >= 256 or chr(nxt) in ".\n":
                break
            out.append(nxt)
            ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)
        return self.tokenizer.decode(out)

    def evaluate(self, num_documents: int = 16) -> dict:
        """Exact-match accuracy on ``num_documents`` new synthetic documents (a seed not used in training)."""
        c = self.config
        triples = make_documents(num_documents, c.context_length, c.facts_per_document, seed=c.seed + 10 ** 6)
        predictions = [self.answer_question(doc, q, max_new_bytes=len(a) + 1) for doc, q, a in triples]
        return {"exact_match": exact_match(predictions, [a for _, _, a in triples]), "documents": num_documents}
