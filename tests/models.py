"""Small real models with synthetic batches, shared by the tests.

Each `ModelCase` builds a model, makes a batch from a `torch.Generator` (so data never touches
the global RNG that dropout uses) and computes the scalar training loss.

Example:
    >>> import torch
    >>> case = CASES["mlp"]
    >>> model = case.build(); batch = case.make_batch(torch.Generator().manual_seed(0))
    >>> case.loss(model, batch).dim()
    0
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

Batch = dict[str, torch.Tensor]

NEEDS_TRANSFORMERS = "needs transformers: pip install -e '.[test]'"


# ------------------------------------------------------------------ plain torch models
class MLP(nn.Module):
    """Linear-ReLU-Dropout stack for (batch, features) inputs."""

    def __init__(self, features: int = 8, hidden: int = 16, classes: int = 3,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.act1 = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act1(self.fc1(x)))
        return self.head(self.act2(self.fc2(x)))


class ResidualBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU(inplace)-conv-BN, `out += identity`, ReLU(inplace)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu2(out)


class CNN(nn.Module):
    """Conv stem with BatchNorm, two residual blocks, dropout and a linear head."""

    def __init__(self, channels: int = 4, classes: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.blocks = nn.Sequential(ResidualBlock(channels), ResidualBlock(channels))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.relu(self.bn(self.stem(x))))
        return self.fc(self.drop(self.pool(x).flatten(1)))


class LSTMClassifier(nn.Module):
    """Two-layer LSTM with inter-layer dropout over (batch, time, features); last step to a head."""

    def __init__(self, features: int = 6, hidden: int = 12, classes: int = 3,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=2, batch_first=True, dropout=dropout)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class TransformerClassifier(nn.Module):
    """nn.TransformerEncoder over (batch, time, d_model) inputs, mean-pooled to a head."""

    def __init__(self, d_model: int = 16, classes: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, nhead=2, dim_feedforward=32,
                                           dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


# ------------------------------------------------------------------ transformers models
VOCAB = 100


def gpt2() -> nn.Module:
    """GPT-2 language model from a tiny config (wte and lm_head tied), random init."""
    pytest.importorskip("transformers", reason=NEEDS_TRANSFORMERS)
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                        bos_token_id=0, eos_token_id=0, loss_type="ForCausalLM",
                        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    return GPT2LMHeadModel(config)


def bert() -> nn.Module:
    """BERT sequence classifier from a tiny config, random init."""
    pytest.importorskip("transformers", reason=NEEDS_TRANSFORMERS)
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                        num_labels=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return BertForSequenceClassification(config)


# ------------------------------------------------------------------ batches and losses
def float_batch(shape: tuple[int, ...], classes: int = 3) -> Callable[[torch.Generator], Batch]:
    """A maker of {"x": normal floats of `shape`, "y": class labels for dim 0}."""

    def make(gen: torch.Generator) -> Batch:
        x = torch.randn(shape, generator=gen)
        y = torch.randint(0, classes, (shape[0],), generator=gen)
        return {"x": x, "y": y}

    return make


def token_batch(batch: int = 4, length: int = 12, classes: int = 3
                ) -> Callable[[torch.Generator], Batch]:
    """A maker of {"input_ids": int64 token ids, "labels": class labels}."""

    def make(gen: torch.Generator) -> Batch:
        ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
        return {"input_ids": ids, "labels": torch.randint(0, classes, (batch,), generator=gen)}

    return make


def classify_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"])


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def hf_classify_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


@dataclass(frozen=True)
class ModelCase:
    """A model builder, its synthetic batch maker and its loss."""

    name: str
    build: Callable[[], nn.Module]
    make_batch: Callable[[torch.Generator], Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor]

    def batches(self, count: int, seed: int = 0) -> list[Batch]:
        """`count` batches from a private generator seeded with `seed`."""
        gen = torch.Generator().manual_seed(seed)
        return [self.make_batch(gen) for _ in range(count)]


CASES: dict[str, ModelCase] = {
    "mlp": ModelCase("mlp", MLP, float_batch((16, 8)), classify_loss),
    "cnn": ModelCase("cnn", CNN, float_batch((4, 1, 8, 8)), classify_loss),
    "lstm": ModelCase("lstm", LSTMClassifier, float_batch((4, 5, 6)), classify_loss),
    "transformer": ModelCase("transformer", TransformerClassifier, float_batch((4, 6, 16)),
                             classify_loss),
    # inputs of 32768 and outputs of 65536+ values: the blocked input path, statistics from
    # staged samples, exact NaN/Inf counts
    "wide_mlp": ModelCase("wide_mlp", lambda: MLP(features=512, hidden=1024),
                          float_batch((64, 512)), classify_loss),
    "wide_cnn": ModelCase("wide_cnn", lambda: CNN(channels=16), float_batch((8, 1, 24, 24)),
                          classify_loss),
    "gpt2": ModelCase("gpt2", gpt2, token_batch(), lm_loss),
    "bert": ModelCase("bert", bert, token_batch(), hf_classify_loss),
}


def train(case: ModelCase, steps: int = 3, seed: int = 0, lr: float = 1e-2,
          watch: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train `case` for `steps` Adam steps from seed `seed`; with `watch`, under gradscope.

    Returns {"losses": [...], "state": state_dict copy, "scope": Scope or None}.
    """
    torch.manual_seed(seed)
    model = case.build()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    scope = None
    if watch is not None:
        import gradscope

        scope = gradscope.watch(model, opt, **watch)
    losses = []
    try:
        for batch in case.batches(steps, seed):
            opt.zero_grad()
            loss = case.loss(model, batch)
            loss.backward()
            opt.step()
            if scope is not None:
                scope.step(loss)
            losses.append(loss.detach().clone())
    finally:
        if scope is not None:
            scope.close()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"losses": losses, "state": state, "scope": scope, "model": model}
