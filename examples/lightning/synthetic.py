"""Synthetic stand-ins for the datasets of Lightning's example scripts: nothing is downloaded, no torchvision.

``MNIST`` takes the arguments of ``lightning.pytorch.demos.mnist_datamodule.MNIST`` and has its sizes (60,000
training and 10,000 test images of 1x28x28, labels 0-9); each image is drawn from its own index, so nothing is
held in memory and a run reads only the few images it uses. ``transforms.ToTensor`` stands in for
torchvision's (the images are tensors already). ``WikiText2`` has the interface of
``lightning.pytorch.demos.WikiText2``: ``vocab_size`` and ``(inputs, target)`` blocks of ``block_size``
tokens, the target shifted by one.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils.data import Dataset


class MNIST(Dataset):
    def __init__(
        self,
        root: str = "",
        train: bool = True,
        download: bool = True,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.train = train
        self.transform = transform

    def __len__(self) -> int:
        return 60_000 if self.train else 10_000

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(index + (0 if self.train else 1_000_000))
        label = int(torch.randint(10, (), generator=g))
        # A blob whose position depends on the label, plus noise: learnable, and different per image.
        img = 0.1 * torch.rand(1, 28, 28, generator=g)
        row, col = divmod(label, 4)
        img[:, 4 + 6 * row : 10 + 6 * row, 4 + 6 * col : 10 + 6 * col] += 0.9
        return (self.transform(img) if self.transform else img), label


transforms = SimpleNamespace(ToTensor=lambda: lambda x: x)


class WikiText2(Dataset):
    def __init__(self, block_size: int = 35, vocab_size: int = 500, tokens: int = 4100 * 35 + 1) -> None:
        g = torch.Generator().manual_seed(0)
        # A Markov chain of tokens: each token makes a few successors likely, so there is something to learn.
        successors = torch.randint(vocab_size, (vocab_size, 4), generator=g)
        data = torch.empty(tokens, dtype=torch.long)
        data[0] = 0
        picks = torch.randint(4, (tokens,), generator=g)
        for i in range(1, tokens):
            data[i] = successors[data[i - 1], picks[i]]
        self.data = data
        self.block_size = block_size
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def __len__(self) -> int:
        return len(self.data) // self.block_size - 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.block_size
        end = start + self.block_size
        return self.data[start:end], self.data[start + 1 : end + 1]
