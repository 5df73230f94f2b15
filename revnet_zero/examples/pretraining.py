"""Long-context pretraining of a reversible GPT on local text, from Python.

The default corpus is the Python standard library's own ``.py`` files (every machine with Python has
them; nothing is downloaded), tokenized as bytes. The run first measures, on one batch, the activation
memory of reversible and of ordinary training of the same model, then trains with ``Trainer``.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from ..data import ByteTokenizer, PackedDataset, read_texts
from ..demo import stdlib_sources
from ..models import PRESETS, ReversibleGPT, TransformerConfig
from ..training import Trainer, TrainingConfig, compare_policies
from ..training.trainer import PRECISIONS

# Names of corpora that live on the network: asked for by name, they get an error that names the offline way.
REMOTE_DATASETS = {"openwebtext", "the_pile", "pile", "c4", "redpajama", "fineweb", "wikitext", "pg19"}


@dataclasses.dataclass
class PretrainingConfig:
    model_size: str = "tiny"             # a TransformerConfig preset: 'tiny', 'S', 'M', 'llama8b'
    context_length: int = 256            # tokens (bytes) per training sequence
    batch_size: int = 2                  # sequences per micro-batch
    gradient_accumulation: int = 1       # micro-batches per optimizer step
    dataset: str = "stdlib"              # 'stdlib' or a local text file / folder
    max_chars: int = 400_000             # characters of text read (the corpus is cut here)
    learning_rate: float = 2e-3          # AdamW peak learning rate (cosine schedule)
    precision: str = "fp32"              # 'fp32', 'bf16' or 'fp16' (autocast)
    device: str | None = None            # None: cuda if available, else cpu
    seed: int = 0                        # weights, file order and batch order

    def __post_init__(self):
        if self.model_size not in PRESETS:
            raise ValueError(f"model_size must be one of {sorted(PRESETS)}, got {self.model_size!r}")
        for name in ("context_length", "batch_size", "gradient_accumulation", "max_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {self.context_length}")
        if self.dataset.lower() in REMOTE_DATASETS:
            raise ValueError(f"dataset={self.dataset!r} would be downloaded, which this example does not do; "
                             "use dataset='stdlib' (the Python standard library's source, on this machine) or "
                             "the path of a local text file or folder")
        if self.precision not in PRECISIONS:   # now, not after the corpus is read
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        # Path('') is the working directory: an empty dataset would read it silently
        if not self.dataset or (self.dataset != "stdlib" and not Path(self.dataset).exists()):
            raise ValueError(f"dataset={self.dataset!r} is neither 'stdlib' nor an existing file or folder")
        if (isinstance(self.learning_rate, bool) or not isinstance(self.learning_rate, (int, float))
                or not 0 < self.learning_rate < math.inf):
            raise ValueError(f"learning_rate must be a positive finite number, got {self.learning_rate!r}")


class LongContextPretraining:
    """Pretrain a reversible GPT on local text at a chosen context length.

    Keyword arguments are the fields of ``PretrainingConfig``. ``run(steps)`` returns a summary: the
    first and last training loss, the held-out loss, tokens per second, and the activation memory of
    reversible vs ordinary training of one batch ``[batch_size, context_length]``.

    Example::

        pretrainer = LongContextPretraining(model_size="tiny", context_length=256, batch_size=2)
        summary = pretrainer.run(steps=20)
        print(summary["loss_first"], summary["loss_last"], summary["activation_memory"])
    """

    def __init__(self, **options):
        self.config = PretrainingConfig(**options)
        c = self.config
        self.tokenizer = ByteTokenizer()
        model_config = TransformerConfig.preset(c.model_size, vocab_size=self.tokenizer.vocab_size,
                                                max_seq_len=max(c.context_length, 2))
        torch.manual_seed(c.seed)
        self.device = torch.device(c.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = ReversibleGPT(model_config).to(self.device)

    def datasets(self) -> tuple[PackedDataset, PackedDataset]:
        """Training and held-out sequences ``[N, context_length]`` of the configured corpus (2% held out)."""
        c = self.config
        if c.dataset == "stdlib":
            corpus = stdlib_sources(max_chars=c.max_chars, seed=c.seed)
        else:
            root = Path(c.dataset)
            files = sorted(root.rglob("*.txt")) + sorted(root.rglob("*.py")) if root.is_dir() else [root]
            corpus = read_texts(files, c.max_chars)
            if not corpus.texts:
                raise ValueError(f"dataset={c.dataset!r} holds no readable text (.txt or .py files, UTF-8)")
        data = PackedDataset.from_texts(corpus.texts, self.tokenizer, c.context_length)
        if len(data) < 2:
            raise ValueError(f"{c.dataset!r} gives {len(data)} sequence(s) of {c.context_length} tokens; "
                             "use more text (max_chars) or a shorter context_length")
        return data.split(max(0.02, 1 / len(data)))

    def run(self, steps: int = 20, time_limit_s: float | None = None, out_dir: str | None = None) -> dict:
        """Train ``steps`` optimizer steps (or until ``time_limit_s``); ``out_dir`` gets checkpoints and
        metrics (None: nothing is written)."""
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        c = self.config
        train_set, eval_set = self.datasets()
        batch = torch.stack([train_set[i % len(train_set)] for i in range(c.batch_size)]).long().to(self.device)
        memory = compare_policies(self.model, batch)
        trainer = Trainer(self.model, TrainingConfig(
            lr=c.learning_rate, batch_size=c.batch_size, gradient_accumulation_steps=c.gradient_accumulation,
            precision=c.precision, device=str(self.device), out_dir=out_dir, progress=False, log_every=1,
            eval_batches=4, seed=c.seed, warmup_steps=max(1, steps // 10)))
        summary = trainer.train(train_set, eval_set, num_steps=steps, time_limit_s=time_limit_s)
        losses = [h["loss"] for h in trainer.history if "loss" in h]
        tokens = summary["steps_this_run"] * c.batch_size * c.gradient_accumulation * c.context_length
        return {"loss_first": losses[0], "loss_last": losses[-1], "eval_loss": summary.get("eval_loss"),
                "steps": summary["steps_this_run"], "tokens_per_s": tokens / summary["seconds"],
                "activation_memory": memory, "losses": losses}
