"""Real torch workloads a GPU worker runs for a lease: training steps and inference batches.

Every workload is deterministic under its seed (the weights and the data come from
seeded generators) and runs on CUDA when `torch.cuda.is_available()`, else on the CPU.
Its input batches are made once, up front, on the device (a pool of `DATA_POOL_BATCHES`
that the steps cycle through), so a step does no host work beyond launching kernels and
never synchronizes with the device: a step's result stays on the device.

A step is split in two so a meter can look at the input before running it:
`next_batch()` picks the batch (and says how many samples and tokens it holds),
`run(batch)` does the work. The shapes a workload produces are few and fixed
(`Batch.shape_key`), so FLOPs can be counted once per shape (`workers.metering`).

- `TrainingWorkload`: a tiny transformer encoder classifier (pre-norm blocks, attention
  through `scaled_dot_product_attention`), AdamW, cross-entropy; one step is forward,
  backward and an optimizer step on one batch of token sequences.
- `InferenceWorkload`: the same encoder under `torch.inference_mode()`, batched forward
  passes over sequences of `INFERENCE_LENGTH_BUCKETS` lengths (so two input shapes).
- `MlpTrainingWorkload`: an MLP classifier on dense features, SGD with momentum; the
  cheapest step (no tokens: its batches report zero tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, TypeVar

import torch
import torch.nn.functional as F  # noqa: N812 (the torch convention)
from torch import nn

DATA_POOL_BATCHES = 8
"""Input batches made up front per workload; the steps cycle through them."""
INFERENCE_LENGTH_BUCKETS = (1, 2)
"""Inference sequence lengths, as divisors of the size's `seq_len` (full, half)."""
LEARNING_RATE = 1e-3

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class WorkloadKind(StrEnum):
    """What a lease runs: `aether worker gpu --workload train|infer`."""

    train = "train"
    infer = "infer"


class WorkloadSize(StrEnum):
    """`small` keeps a CPU step to a few milliseconds; `large` is a realistic GPU step."""

    small = "small"
    large = "large"


@dataclass(frozen=True, slots=True)
class EncoderSize:
    """The dimensions of the transformer encoder and of its batches."""

    vocab_size: int
    d_model: int
    heads: int
    layers: int
    ff_mult: int
    """Width of the feed-forward layer as a multiple of `d_model`."""
    seq_len: int
    batch_size: int
    classes: int


ENCODER_SIZES: dict[WorkloadSize, EncoderSize] = {
    WorkloadSize.small: EncoderSize(
        vocab_size=256, d_model=32, heads=2, layers=1, ff_mult=2, seq_len=16, batch_size=8,
        classes=8,
    ),
    # About 6.3 M parameters in the blocks plus 4.2 M in the embeddings.
    WorkloadSize.large: EncoderSize(
        vocab_size=8_192, d_model=512, heads=8, layers=2, ff_mult=4, seq_len=256,
        batch_size=64, classes=16,
    ),
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class MlpSize:
    features: int
    hidden: int
    classes: int
    batch_size: int


MLP_SIZES: dict[WorkloadSize, MlpSize] = {
    WorkloadSize.small: MlpSize(features=64, hidden=128, classes=10, batch_size=32),
    WorkloadSize.large: MlpSize(features=1_024, hidden=4_096, classes=100, batch_size=256),
}


@dataclass(frozen=True, slots=True)
class Batch:
    """One step's input, on the workload's device."""

    inputs: torch.Tensor
    targets: torch.Tensor | None
    """Class labels for a training step; None for inference."""
    samples: int
    """Examples in the batch (sequences, or rows of features)."""
    tokens: int
    """Tokens in the batch (samples x sequence length); 0 for dense features."""

    @property
    def shape_key(self) -> tuple[int, ...]:
        """What a step's FLOPs depend on within one workload: the input's shape."""
        return tuple(self.inputs.shape)


class Workload(Protocol):
    """A step-wise torch workload (see the module docstring)."""

    @property
    def name(self) -> str: ...

    @property
    def device(self) -> torch.device: ...

    def next_batch(self) -> Batch: ...

    def run(self, batch: Batch) -> None: ...


def default_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def default_size(device: torch.device) -> WorkloadSize:
    return WorkloadSize.large if device.type == "cuda" else WorkloadSize.small


class EncoderBlock(nn.Module):
    """A pre-norm transformer encoder block: self-attention, then a GELU feed-forward."""

    def __init__(self, d_model: int, heads: int, ff_mult: int) -> None:
        super().__init__()
        assert d_model % heads == 0, "d_model must be a multiple of heads"
        self.heads = heads
        self.norm_attention = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.projection = nn.Linear(d_model, d_model)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff_in = nn.Linear(d_model, ff_mult * d_model)
        self.ff_out = nn.Linear(ff_mult * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(self.norm_attention(x))
        q, k, v = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)
        x = x + self.projection(attended.transpose(1, 2).reshape(batch, length, width))
        out: torch.Tensor = x + self.ff_out(F.gelu(self.ff_in(self.norm_ff(x))))
        return out


class EncoderClassifier(nn.Module):
    """Token and position embeddings, encoder blocks, mean pooling, a linear head."""

    def __init__(self, size: EncoderSize) -> None:
        super().__init__()
        self.tokens = nn.Embedding(size.vocab_size, size.d_model)
        self.positions = nn.Parameter(torch.zeros(size.seq_len, size.d_model))
        self.blocks = nn.ModuleList(
            EncoderBlock(size.d_model, size.heads, size.ff_mult) for _ in range(size.layers)
        )
        self.norm = nn.LayerNorm(size.d_model)
        self.head = nn.Linear(size.d_model, size.classes)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(token_ids) + self.positions[: token_ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.head(self.norm(x).mean(dim=1))
        return logits


def _seeded(build: Callable[[], ModuleT], seed: int) -> ModuleT:
    """Build a module with weights drawn from `seed` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _token_batches(
    size: EncoderSize, lengths: tuple[int, ...], seed: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Token sequences and labels (a learnable rule: the tokens' sum modulo classes)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(DATA_POOL_BATCHES):
        length = lengths[i % len(lengths)]
        ids = torch.randint(
            0, size.vocab_size, (size.batch_size, length), generator=generator, dtype=torch.long
        )
        labels = ids.sum(dim=1) % size.classes
        batches.append((ids.to(device), labels.to(device)))
    return batches


class _EncoderWorkload:
    """What the encoder's training and inference workloads share: the seeded model on its
    device and a fixed pool of token batches (made on the device up front)."""

    kind = ""
    """"train" or "infer": the first part of the workload's name."""

    def __init__(
        self,
        size: WorkloadSize,
        seed: int,
        device: torch.device | None,
        lengths: tuple[int, ...],
    ) -> None:
        self._device = device or default_device()
        self._size = ENCODER_SIZES[size]
        self._model = _seeded(lambda: EncoderClassifier(self._size), seed).to(self._device)
        self._batches = _token_batches(self._size, lengths, seed + 1, self._device)
        self._next = 0

    @property
    def name(self) -> str:
        return f"{self.kind}/encoder-{self._size.d_model}x{self._size.layers}"

    @property
    def device(self) -> torch.device:
        return self._device

    def _next_tokens(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        ids, labels = self._batches[self._next % DATA_POOL_BATCHES]
        self._next += 1
        samples, length = ids.shape
        return ids, labels, samples, samples * length


class TrainingWorkload(_EncoderWorkload):
    """Training steps of `EncoderClassifier` with AdamW (forward, backward, optimizer step)."""

    kind = "train"

    def __init__(self, size: WorkloadSize, seed: int, device: torch.device | None = None) -> None:
        super().__init__(size, seed, device, (ENCODER_SIZES[size].seq_len,))
        self._optimizer = torch.optim.AdamW(self._model.parameters(), lr=LEARNING_RATE)
        self._loss: torch.Tensor | None = None

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def last_loss(self) -> torch.Tensor | None:
        """The last step's loss, on the device (reading it synchronizes: tests only)."""
        return self._loss

    def next_batch(self) -> Batch:
        ids, labels, samples, tokens = self._next_tokens()
        return Batch(inputs=ids, targets=labels, samples=samples, tokens=tokens)

    def run(self, batch: Batch) -> None:
        assert batch.targets is not None, "a training batch has targets"
        self._model.train()
        self._optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self._model(batch.inputs), batch.targets)
        loss.backward()  # type: ignore[no-untyped-call]
        self._optimizer.step()
        self._loss = loss.detach()


class InferenceWorkload(_EncoderWorkload):
    """Batched forward passes of `EncoderClassifier` under `torch.inference_mode()`."""

    kind = "infer"

    def __init__(self, size: WorkloadSize, seed: int, device: torch.device | None = None) -> None:
        seq_len = ENCODER_SIZES[size].seq_len
        super().__init__(size, seed, device, tuple(seq_len // d for d in INFERENCE_LENGTH_BUCKETS))
        self._model.eval()
        self._predictions: torch.Tensor | None = None

    @property
    def last_predictions(self) -> torch.Tensor | None:
        return self._predictions

    def next_batch(self) -> Batch:
        ids, _, samples, tokens = self._next_tokens()
        return Batch(inputs=ids, targets=None, samples=samples, tokens=tokens)

    def run(self, batch: Batch) -> None:
        with torch.inference_mode():
            self._predictions = self._model(batch.inputs).argmax(dim=-1)


class Mlp(nn.Module):
    def __init__(self, size: MlpSize) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(size.features, size.hidden),
            nn.ReLU(),
            nn.Linear(size.hidden, size.hidden),
            nn.ReLU(),
            nn.Linear(size.hidden, size.classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


class MlpTrainingWorkload:
    """Training steps of a three-layer MLP with SGD and momentum."""

    def __init__(self, size: WorkloadSize, seed: int, device: torch.device | None = None) -> None:
        self._device = device or default_device()
        self._size = MLP_SIZES[size]
        self._model = _seeded(lambda: Mlp(self._size), seed).to(self._device)
        self._optimizer = torch.optim.SGD(self._model.parameters(), lr=LEARNING_RATE, momentum=0.9)
        generator = torch.Generator().manual_seed(seed + 1)
        self._batches = []
        for _ in range(DATA_POOL_BATCHES):
            x = torch.randn(self._size.batch_size, self._size.features, generator=generator)
            y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
            self._batches.append((x.to(self._device), y.to(self._device)))
        self._next = 0
        self._loss: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return f"train/mlp-{self._size.hidden}"

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def last_loss(self) -> torch.Tensor | None:
        return self._loss

    def next_batch(self) -> Batch:
        x, y = self._batches[self._next % DATA_POOL_BATCHES]
        self._next += 1
        return Batch(inputs=x, targets=y, samples=int(x.shape[0]), tokens=0)

    def run(self, batch: Batch) -> None:
        assert batch.targets is not None, "a training batch has targets"
        self._model.train()
        self._optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self._model(batch.inputs), batch.targets)
        loss.backward()  # type: ignore[no-untyped-call]
        self._optimizer.step()
        self._loss = loss.detach()


def make_workload(
    kind: WorkloadKind,
    seed: int,
    size: WorkloadSize | None = None,
    device: torch.device | None = None,
) -> Workload:
    """The workload a lease runs; `size` defaults to `large` on CUDA, `small` on the CPU."""
    device = device or default_device()
    size = size or default_size(device)
    if kind is WorkloadKind.train:
        return TrainingWorkload(size, seed, device)
    return InferenceWorkload(size, seed, device)
