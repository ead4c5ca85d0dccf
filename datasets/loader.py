"""A DataLoader replacement for data that fits in memory: batches are slices of one tensor.

MNIST is 47 MB as bytes, so the template's per-sample PIL pipeline is pure overhead
(``benchmarks/loaders.py`` measures both). This loader shuffles with one ``randperm``, indexes whole
batches and applies transforms batch-wise, with no worker processes.
"""

import torch
from torch.utils.data import TensorDataset


class TensorLoader:
    """Iterate over ``tensors`` in batches along dimension 0.

    ``transform(batch_of_first_tensor, generator)`` runs on each batch of the first tensor
    (augmentation, dynamic binarization). ``generator`` seeds shuffling and transforms; by default
    the global RNG is used, so seeding torch (and restoring its state on resume) reproduces a run.
    Yields a tuple of tensors, or the bare tensor when ``tensors`` holds one.
    """

    def __init__(self, *tensors, batch_size=128, shuffle=False, transform=None, generator=None,
                 drop_last=False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = TensorDataset(*tensors)
        self.tensors = tensors
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.transform = transform
        self.generator = generator
        self.drop_last = drop_last

    def __len__(self):
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.dataset)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            if order is None:
                batch = [t[start:start + self.batch_size] for t in self.tensors]
            else:
                index = order[start:start + self.batch_size]
                batch = [t[index] for t in self.tensors]
            if self.transform is not None:
                batch[0] = self.transform(batch[0], self.generator)
            yield batch[0] if len(batch) == 1 else tuple(batch)
