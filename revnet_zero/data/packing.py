"""Packing documents into fixed-length sequences, and batches in a seeded order that can be resumed."""
from __future__ import annotations

import math

import torch
from torch import Tensor


class PackedDataset(torch.utils.data.Dataset):
    """A token stream cut into ``len(self)`` sequences of ``seq_len`` tokens; item i is a LongTensor [S].

    ``from_texts`` joins the documents with the tokenizer's EOS after each, so sequences cross document
    boundaries (the model learns that EOS starts a new document); the tail shorter than ``seq_len`` is
    dropped. Tokens are held as int32.

    Example::

        ds = PackedDataset.from_texts(["a b c", "d e"], ByteTokenizer(), seq_len=4)
        ds[0]   # tensor([ 97,  32,  98,  32])
    """

    def __init__(self, tokens: Tensor, seq_len: int):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 (one next-token target), got {seq_len}")
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        n = tokens.numel() // seq_len
        if n == 0:
            raise ValueError(f"{tokens.numel()} tokens do not fill one sequence of seq_len={seq_len}")
        self.seq_len = seq_len
        self.sequences = tokens[: n * seq_len].to(torch.int32).view(n, seq_len)  # [N, S]

    @classmethod
    def from_texts(cls, texts, tokenizer, seq_len: int) -> PackedDataset:
        ids = [torch.tensor(tokenizer.encode(t, add_eos=True), dtype=torch.int32) for t in texts]
        if not ids:
            raise ValueError("from_texts got no texts")
        return cls(torch.cat(ids), seq_len)

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def __getitem__(self, i) -> Tensor:
        return self.sequences[i].long()

    def split(self, eval_fraction: float) -> tuple[PackedDataset, PackedDataset]:
        """(train, eval): the last ``ceil(eval_fraction * len)`` sequences are held out."""
        n_eval = math.ceil(eval_fraction * len(self))
        if not 0 < eval_fraction < 1 or not 0 < n_eval < len(self):
            raise ValueError(f"eval_fraction={eval_fraction} leaves no train or no eval sequence out of "
                             f"{len(self)}")
        flat = self.sequences.view(-1)
        cut = (len(self) - n_eval) * self.seq_len
        return PackedDataset(flat[:cut], self.seq_len), PackedDataset(flat[cut:], self.seq_len)


def collate(items: list):
    """Stack tensors [S] into [B, S]; dicts of tensors key by key."""
    if isinstance(items[0], dict):
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}
    return torch.stack(items)


class Batches:
    """Batches of a map-style dataset, in an order fixed by ``seed``, with a position that can be saved.

    Epoch ``e`` visits the examples in ``torch.randperm`` order drawn from a generator seeded with
    ``seed + e`` (or in index order with ``shuffle=False``); the global RNG is never touched. Iterating
    yields the rest of the current epoch; the next iteration starts the next epoch. ``state_dict()``
    after k batches, loaded into a fresh ``Batches`` over the same dataset, resumes at batch k + 1.
    With ``world_size > 1``, rank r takes batches r, r + world_size, ... of every epoch's order.
    """

    def __init__(self, dataset, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = True,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if world_size > 1 and not drop_last:
            raise ValueError("drop_last=False would give the ranks different numbers of batches")
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch, self.index = 0, 0
        if len(self) == 0:
            raise ValueError(f"{len(dataset)} examples make no batch of batch_size={batch_size} x "
                             f"world_size={world_size}")

    def __len__(self) -> int:
        per_step = self.batch_size * self.world_size
        n = len(self.dataset)
        return n // per_step if self.drop_last else math.ceil(n / per_step)

    def _order(self) -> Tensor:
        if not self.shuffle:
            return torch.arange(len(self.dataset))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=g)

    def __iter__(self):
        order = self._order()
        while self.index < len(self):
            start = (self.index * self.world_size + self.rank) * self.batch_size
            idx = order[start:start + self.batch_size].tolist()
            self.index += 1
            yield collate([self.dataset[i] for i in idx])
        self.epoch, self.index = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_batches": len(self)}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["num_batches"] != len(self):
            raise ValueError(f"data position was saved for seed={state['seed']} with {state['num_batches']} "
                             f"batches per epoch; this data has seed={self.seed} and {len(self)}")
        self.epoch, self.index = state["epoch"], state["index"]
