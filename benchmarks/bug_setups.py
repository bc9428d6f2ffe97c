"""The base training setups of the diagnosis benchmark: real architectures, synthetic data.

Each setup builds a model, its optimizer(s) and a `step(i)` that runs one optimizer step the
way popular code writes it (the PyTorch examples' MNIST net with `F.relu` in forward and
Adadelta, a ResNet with BatchNorm and in-place ReLU residuals, the word-language-model LSTM
with SGD and clipping, nanoGPT's `configure_optimizers` with decay groups, micro-batch
accumulation and clipping on a transformers GPT-2, a BERT classifier, a ViT, the examples' VAE
and DCGAN loop, a frozen-backbone fine-tune, bf16 autocast, fp16 + GradScaler, and the
time-sequence LSTM trained with an LBFGS closure). Setups read `Knobs`, where the bugs live.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.bug_injectors import Knobs, Probe

BATCH = 32
IMAGE_BATCH = 16
DIM = 32
CLASSES = 10
VOCAB = 64
SEQ = 16


# ----------------------------------------------------------------------------------- data
def _gen(seed: int, i: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(1_000_003 * seed + 7919 * i + salt)


class Tabular:
    """Features N(0, 1), labels from a fixed random teacher network (learnable, not trivial)."""

    def __init__(self, seed: int) -> None:
        g = _gen(seed, -1)
        self.seed = seed
        self.w1 = torch.randn(DIM, 64, generator=g) / math.sqrt(DIM)
        self.w2 = torch.randn(64, CLASSES, generator=g)

    def batch(self, i: int, n: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, DIM, generator=_gen(self.seed, i))
        return x, (torch.tanh(x @ self.w1) @ self.w2).argmax(1)


class Images:
    """12x12 one-channel 8-bit images with a constant zero border (as MNIST has): a class
    template plus noise. `batch` returns the uint8 images and the labels."""

    def __init__(self, seed: int) -> None:
        g = _gen(seed, -2)
        self.seed = seed
        self.templates = torch.rand(CLASSES, 8, 8, generator=g)

    def batch(self, i: int, n: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
        g = _gen(self.seed, i)
        y = torch.randint(0, CLASSES, (n,), generator=g)
        inner = 0.6 * self.templates[y] + 0.4 * torch.rand(n, 8, 8, generator=g)
        img = torch.zeros(n, 1, 12, 12, dtype=torch.uint8)
        img[:, 0, 2:10, 2:10] = (inner * 255).round().to(torch.uint8)
        return img, y


class Tokens:
    """Token sequences from a fixed Markov chain (next token = a fixed successor, 85%)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.successor = torch.randperm(VOCAB, generator=_gen(seed, -3))

    def batch(self, i: int, n: int = 8) -> torch.Tensor:
        g = _gen(self.seed, i)
        seq = torch.empty(n, SEQ + 1, dtype=torch.long)
        seq[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
        for t in range(SEQ):
            jump = torch.rand(n, generator=g) < 0.15
            rand = torch.randint(0, VOCAB, (n,), generator=g)
            seq[:, t + 1] = torch.where(jump, rand, self.successor[seq[:, t]])
        return seq


def float_bug(x: torch.Tensor, i: int, k: Knobs) -> torch.Tensor:
    """The data bugs on float inputs: unscaled features, NaN rows, outlier batches."""
    if k.data == "scale":
        x = x * 1000.0
    elif k.data == "nan" and i >= 15 and i % 5 == 0:
        x = x.clone()
        x[0] = float("nan")
    elif k.data == "outliers" and is_outlier_step(i):
        x = x.clone()
        x[:4] *= 1000.0
    return x


def is_outlier_step(i: int) -> bool:
    return i % 11 == 10


def image_input(img: torch.Tensor, i: int, k: Knobs) -> torch.Tensor:
    x = img.float() if k.data == "uint8" else img.float() / 255.0
    return float_bug(x, i, k)


def labels(y: torch.Tensor, i: int, k: Knobs) -> torch.Tensor:
    if k.shuffle_labels:
        return y[torch.randperm(len(y), generator=_gen(7, i))]
    return y


# ------------------------------------------------------------------------ model pieces
def cut(h: torch.Tensor, k: Knobs) -> torch.Tensor:
    """Where a forward breaks the graph (the bug), or the identity."""
    if k.cut == "detach":
        return h.detach()
    if k.cut == "data":
        return h.data
    if k.cut == "numpy":
        return torch.from_numpy(h.detach().float().cpu().numpy()).to(h.dtype)
    return h


def batch_standardise(x: torch.Tensor, k: Knobs) -> torch.Tensor:
    if not k.batch_std_div:
        return x
    return (x - x.mean(0, keepdim=True)) / x.std(0, keepdim=True)


def apply_init(model: nn.Module, k: Knobs) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                if k.init == "zero":
                    m.weight.zero_()
                    if m.bias is not None:
                        m.bias.zero_()
                elif k.init == "randn":
                    m.weight.normal_(0.0, 1.0)


def ce_loss(logits: torch.Tensor, y: torch.Tensor, k: Knobs, model: nn.Module) -> torch.Tensor:
    if k.softmax_before_ce:
        logits = logits.softmax(-1)
    if k.no_grad_loss:
        return _loss_without_grad(logits, y) + 1e-4 * sum(
            p.pow(2).sum() for p in model.parameters() if p.requires_grad)
    return F.cross_entropy(logits, y)


def _loss_without_grad(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # the bug: a metric helper reused as the loss
        return F.cross_entropy(logits, y)


class ReluMLP(nn.Module):
    def __init__(self, k: Knobs) -> None:
        super().__init__()
        self.k = k
        self.fc1, self.act1 = nn.Linear(DIM, 64), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(64, 64), nn.ReLU()
        self.head = nn.Linear(64, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = cut(self.act1(self.fc1(x)), self.k)
        return self.head(self.act2(self.fc2(h)))


class DeepMLP(nn.Module):
    """Six tanh (or sigmoid) layers, the classic deep fully connected net."""

    def __init__(self, k: Knobs) -> None:
        super().__init__()
        self.k = k
        act = nn.Sigmoid if k.act == "sigmoid" else nn.Tanh
        dims = [DIM] + [64] * 6
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            layers += [nn.Linear(a, b), act()]
        self.lower = nn.Sequential(*layers[:6])
        self.upper = nn.Sequential(*layers[6:])
        self.head = nn.Linear(64, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.upper(cut(self.lower(x), self.k)))


class MnistNet(nn.Module):
    """The PyTorch examples' MNIST net (functional ReLU, dropout, log_softmax), for 12x12."""

    def __init__(self, k: Knobs) -> None:
        super().__init__()
        self.k = k
        self.conv1 = nn.Conv2d(1, 8, 3, 1)
        self.conv2 = nn.Conv2d(8, 16, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(256, 64)
        self.fc2 = nn.Linear(64, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = batch_standardise(x, self.k)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.dropout1(F.max_pool2d(x, 2))
        x = cut(F.relu(self.fc1(torch.flatten(x, 1))), self.k)
        return F.log_softmax(self.fc2(self.dropout2(x)), dim=1)


class BasicBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class SmallResNet(nn.Module):
    def __init__(self, k: Knobs) -> None:
        super().__init__()
        self.k = k
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(8), BasicBlock(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = batch_standardise(x, self.k)
        x = cut(self.relu(self.bn1(self.conv1(x))), self.k)
        return self.fc(torch.flatten(self.pool(self.layer1(x)), 1))


class WordLM(nn.Module):
    """The word-language-model example's RNN model (embedding, LSTM, decoder)."""

    def __init__(self, k: Knobs) -> None:
        super().__init__()
        self.k = k
        self.drop = nn.Dropout(0.2)
        self.encoder = nn.Embedding(VOCAB, 32)
        self.rnn = nn.LSTM(32, 64, 1, batch_first=True)
        self.decoder = nn.Linear(64, VOCAB)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.drop(self.encoder(idx)))
        return self.decoder(self.drop(cut(out, self.k)))


class TinyViT(nn.Module):
    def __init__(self, k: Knobs) -> None:
        super().__init__()
        self.k = k
        self.patch = nn.Conv2d(1, 32, 4, 4)
        self.cls = nn.Parameter(torch.zeros(1, 1, 32))
        self.pos = nn.Parameter(torch.randn(1, 10, 32) * 0.02)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(batch_standardise(x, self.k)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        x = cut(self.encoder(x), self.k)
        return self.head(self.norm(x[:, 0]))


class VAE(nn.Module):
    """The PyTorch examples' VAE (functional ReLU, sigmoid decoder), on 144-pixel images."""

    def __init__(self, k: Knobs) -> None:
        super().__init__()
        self.k = k
        self.fc1 = nn.Linear(144, 64)
        self.fc21 = nn.Linear(64, 8)
        self.fc22 = nn.Linear(64, 8)
        self.fc3 = nn.Linear(8, 64)
        self.fc4 = nn.Linear(64, 144)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h1 = cut(F.relu(self.fc1(x)), self.k)
        mu, logvar = self.fc21(h1), self.fc22(h1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


class Sequence(nn.Module):
    """The time-sequence-prediction example's two LSTM cells and linear read-out."""

    def __init__(self, k: Knobs) -> None:
        super().__init__()
        self.k = k
        self.lstm1 = nn.LSTMCell(1, 16)
        self.lstm2 = nn.LSTMCell(16, 16)
        self.linear = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.size(0)
        h1 = c1 = h2 = c2 = torch.zeros(n, 16)
        outputs = []
        for t in range(x.size(1)):
            h1, c1 = self.lstm1(x[:, t:t + 1], (h1, c1))
            h2, c2 = self.lstm2(cut(h1, self.k), (h2, c2))
            outputs.append(self.linear(h2))
        return torch.cat(outputs, 1)


# ------------------------------------------------------------------------------ trainers
@dataclass
class ProbePoint:
    module: nn.Module
    where: str          # "in" (forward pre-hook: a functional activation's output) | "out"
    measure: str        # "dead" (units <= 0 on the whole batch) | "saturated" (|v| > 0.99)


@dataclass
class Trainer:
    """A built setup: the model to watch, its optimizer(s), and one optimizer step."""

    model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    run_step: Callable[[Trainer, int], torch.Tensor]
    k: Knobs
    probe: Probe
    head: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    probe_point: ProbePoint | None = None
    _snap: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._snap = [p.detach().clone() for _, p in self.head]

    def step(self, i: int) -> torch.Tensor:
        return self.run_step(self, i)

    def trainable(self, module: nn.Module | None = None) -> list[tuple[str, torch.Tensor]]:
        module = module or self.model
        return [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    # probes (plain-torch runs only)
    def before_backward(self, module: nn.Module | None = None) -> None:
        if not self.probe.active:
            return
        self.probe.backwards += 1
        if any(p.grad is not None and bool(p.grad.detach().abs().sum() > 0)
               for _, p in self.trainable(module)):
            self.probe.stale_steps += 1

    def after_backward(self, i: int) -> None:
        if not self.probe.active or i != 0:
            return
        params = self.trainable()
        self.probe.none_grads = [n for n, p in params if p.grad is None]
        self.probe.zero_grads = [n for n, p in params
                                 if p.grad is not None and not bool(p.grad.detach().any())]
        self.probe.grad_norms = [float(p.grad.detach().float().norm()) if p.grad is not None
                                 else 0.0 for _, p in params if p.dim() >= 2]

    def see_input(self, x: torch.Tensor, i: int) -> None:
        if self.probe.active and i == 0 and x.is_floating_point():
            self.probe.input_absmax = float(x.detach().abs().nan_to_num(0.0).max())

    def finish(self) -> None:
        if self.probe.active:
            self.probe.unchanged = [n for (n, p), s in zip(self.head, self._snap)
                                    if torch.equal(p.detach(), s)]


def _zero_grad(opt: torch.optim.Optimizer, k: Knobs) -> None:
    if k.skip_zero_grad != "all":
        opt.zero_grad(set_to_none=True)


def _optimizer_params(model: nn.Module, k: Knobs, head: str) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters()
            if not (k.head_not_in_optimizer and n.startswith(head + "."))]


def _prepare(model: nn.Module, k: Knobs, head: str,
             make_opt: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
             ) -> torch.optim.Optimizer:
    """Init, freezing rule, optimizer, late head replacement: where the bugs of set-up live."""
    if k.init:
        apply_init(model, k)
    if k.freeze_head:
        for n, p in model.named_parameters():
            if n.startswith(head + "."):  # a freezing rule matching the wrong names
                p.requires_grad_(False)
    opt = make_opt(_optimizer_params(model, k, head))
    if k.replace_head_after_optimizer:
        old = model.get_submodule(head)
        parent_name, _, attr = head.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, nn.Linear(old.in_features, old.out_features))
    return opt


def _head_params(model: nn.Module, head: str) -> list[tuple[str, torch.Tensor]]:
    return [(f"{head}.{n}", p) for n, p in model.get_submodule(head).named_parameters()]


def supervised(model: nn.Module, opt: torch.optim.Optimizer, k: Knobs, probe: Probe,
               batch: Callable[[int, int], tuple[Any, torch.Tensor]],
               loss_of: Callable[[nn.Module, Any, torch.Tensor], torch.Tensor],
               head: str | None, accum: int = 1, clip: float | None = None,
               amp: torch.dtype | None = None, scaler: Any = None,
               probe_point: ProbePoint | None = None) -> Trainer:
    """The common loop: zero_grad, micro-batches, (scaled) backward, clip, step."""

    def run_step(tr: Trainer, i: int) -> torch.Tensor:
        _zero_grad(opt, k)
        total: torch.Tensor | float = 0.0
        for m in range(accum):
            x, y = batch(i, m)
            tr.see_input(x, i)
            ctx = (torch.autocast("cpu", dtype=amp) if amp is not None
                   else contextlib.nullcontext())
            with ctx:
                loss = loss_of(model, x, y) / accum
            if m == 0:
                tr.before_backward()
            (scaler.scale(loss) if scaler is not None else loss).backward()
            total = total + loss
        if scaler is not None:
            scaler.unscale_(opt)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        tr.after_backward(i)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        assert isinstance(total, torch.Tensor)
        return total

    return Trainer(model, [opt], run_step, k, probe,
                   _head_params(model, head) if head else [], probe_point)


# --------------------------------------------------------------------------------- setups
def _tabular_batches(seed: int, k: Knobs, n: int = BATCH) -> Callable[[int, int], Any]:
    data = Tabular(seed)

    def batch(i: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = data.batch(i * 8 + m, n)
        return float_bug(x, i, k), labels(y, i, k)
    return batch


def _image_batches(seed: int, k: Knobs) -> Callable[[int, int], Any]:
    data = Images(seed)

    def batch(i: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, y = data.batch(i * 8 + m, IMAGE_BATCH)
        return image_input(img, i, k), labels(y, i, k)
    return batch


def _classify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: Knobs) -> torch.Tensor:
    return ce_loss(model(x).float(), y, k, model)


def build_mlp_tanh(k: Knobs, probe: Probe, seed: int) -> Trainer:
    model = DeepMLP(k)
    opt = _prepare(model, k, "head", lambda ps: torch.optim.Adam(ps, lr=1e-3 * k.lr_scale))
    return supervised(model, opt, k, probe, _tabular_batches(seed, k),
                      lambda mdl, x, y: _classify(mdl, x, y, k), "head",
                      probe_point=ProbePoint(model.lower[1], "out", "saturated"))


def build_mnist_net(k: Knobs, probe: Probe, seed: int) -> Trainer:
    model = MnistNet(k)
    if k.neg_bias:
        with torch.no_grad():
            model.fc1.bias.fill_(-10.0)
    opt = _prepare(model, k, "fc2",
                   lambda ps: torch.optim.Adadelta(ps, lr=1.0 * k.lr_scale))
    return supervised(model, opt, k, probe, _image_batches(seed, k),
                      lambda mdl, x, y: _classify(mdl, x, y, k), "fc2",
                      probe_point=ProbePoint(model.fc2, "in", "dead"))


def build_resnet(k: Knobs, probe: Probe, seed: int) -> Trainer:
    model = SmallResNet(k)
    if k.neg_bias:
        with torch.no_grad():
            model.bn1.bias.fill_(-5.0)
    opt = _prepare(model, k, "fc", lambda ps: torch.optim.SGD(
        ps, lr=0.05 * k.lr_scale, momentum=0.9, weight_decay=5e-4))
    return supervised(model, opt, k, probe, _image_batches(seed, k),
                      lambda mdl, x, y: _classify(mdl, x, y, k), "fc",
                      probe_point=ProbePoint(model.relu, "out", "dead"))


def _lm_batches(seed: int, k: Knobs, n: int = 8) -> Callable[[int, int], Any]:
    data = Tokens(seed)

    def batch(i: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        seq = data.batch(i * 8 + m, n)
        x, y = seq[:, :-1], seq[:, 1:]
        if k.shuffle_labels:
            y = y.reshape(-1)[torch.randperm(y.numel(), generator=_gen(7, i))].view_as(y)
        return x, y
    return batch


def _lm_loss(logits: torch.Tensor, y: torch.Tensor, k: Knobs, model: nn.Module) -> torch.Tensor:
    return ce_loss(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), k, model)


def build_lstm_lm(k: Knobs, probe: Probe, seed: int) -> Trainer:
    model = WordLM(k)
    opt = _prepare(model, k, "decoder", lambda ps: torch.optim.SGD(ps, lr=20.0 * k.lr_scale))
    return supervised(model, opt, k, probe, _lm_batches(seed, k, 16),
                      lambda mdl, x, y: _lm_loss(mdl(x), y, k, mdl), "decoder", clip=0.25)


def _cut_hook(module: nn.Module, k: Knobs) -> None:
    """Break the graph at a transformer block's output (HF models: no forward to edit)."""
    if k.cut is None:
        return

    def hook(mod: nn.Module, args: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            return (cut(out[0], k), *out[1:])
        return cut(out, k)
    module.register_forward_hook(hook)


def configure_optimizers(model: nn.Module, weight_decay: float, learning_rate: float,
                         betas: tuple[float, float], params: list[torch.Tensor]
                         ) -> torch.optim.Optimizer:
    """nanoGPT's: weight decay on every 2D tensor, none on biases and norms."""
    keep = {id(p) for p in params}
    param_dict = {pn: p for pn, p in model.named_parameters() if p.requires_grad
                  and id(p) in keep}
    decay_params = [p for n, p in param_dict.items() if p.dim() >= 2]
    nodecay_params = [p for n, p in param_dict.items() if p.dim() < 2]
    optim_groups = [{"params": decay_params, "weight_decay": weight_decay},
                    {"params": nodecay_params, "weight_decay": 0.0}]
    return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas)


def build_gpt2(k: Knobs, probe: Probe, seed: int) -> Trainer:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config)
    _cut_hook(model.transformer.h[0], k)
    opt = _prepare(model, k, "lm_head", lambda ps: configure_optimizers(
        model, 0.1, 1e-3 * k.lr_scale, (0.9, 0.95), ps))
    return supervised(model, opt, k, probe, _lm_batches(seed, k, 4),
                      lambda mdl, x, y: _lm_loss(mdl(x).logits, y, k, mdl), None,
                      accum=2, clip=1.0)


def build_bert(k: Knobs, probe: Probe, seed: int) -> Trainer:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=32, num_labels=4, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config)
    _cut_hook(model.bert.encoder.layer[0], k)
    opt = _prepare(model, k, "classifier", lambda ps: torch.optim.AdamW(
        ps, lr=1e-3 * k.lr_scale, weight_decay=0.01))
    data = Tokens(seed)

    def batch(i: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = data.batch(i, 8)[:, :SEQ]
        return idx, labels(idx[:, 0] % 4, i, k)
    return supervised(model, opt, k, probe, batch,
                      lambda mdl, x, y: ce_loss(mdl(input_ids=x).logits, y, k, mdl),
                      "classifier", clip=1.0)


def build_vit(k: Knobs, probe: Probe, seed: int) -> Trainer:
    model = TinyViT(k)
    opt = _prepare(model, k, "head", lambda ps: torch.optim.AdamW(
        ps, lr=1e-3 * k.lr_scale, weight_decay=0.05))
    return supervised(model, opt, k, probe, _image_batches(seed, k),
                      lambda mdl, x, y: _classify(mdl, x, y, k), "head", clip=1.0)


def build_vae(k: Knobs, probe: Probe, seed: int) -> Trainer:
    model = VAE(k)
    if k.neg_bias:
        with torch.no_grad():
            model.fc1.bias.fill_(-10.0)
    opt = _prepare(model, k, "fc4", lambda ps: torch.optim.Adam(ps, lr=1e-3 * k.lr_scale))
    data = Images(seed)

    def batch(i: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, _ = data.batch(i)
        x = img.float().view(-1, 144) / 255.0
        return x, x

    def loss_of(mdl: nn.Module, x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        recon, mu, logvar = mdl(x)
        bce = F.binary_cross_entropy(recon, x, reduction="sum")
        return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return supervised(model, opt, k, probe, batch, loss_of, None,
                      probe_point=ProbePoint(model.fc21, "in", "dead"))


def build_gan(k: Knobs, probe: Probe, seed: int) -> Trainer:
    """The DCGAN example's loop (D on real, D on fake, then G), on 16-dim vectors."""
    g_net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(True), nn.Linear(32, 16), nn.Tanh())
    d_net = nn.Sequential(nn.Linear(16, 32), nn.LeakyReLU(0.2, inplace=True),
                          nn.Linear(32, 1), nn.Sigmoid())
    model = nn.ModuleDict({"g": g_net, "d": d_net})
    lr = 2e-4 * k.lr_scale
    opt_d = torch.optim.Adam(d_net.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(g_net.parameters(), lr=lr, betas=(0.5, 0.999))
    mix = torch.randn(4, 16, generator=_gen(seed, -4))
    criterion = nn.BCELoss()

    def run_step(tr: Trainer, i: int) -> torch.Tensor:
        g = _gen(seed, i)
        real = torch.tanh(torch.randn(BATCH, 4, generator=g) @ mix)
        noise = torch.randn(BATCH, 8, generator=g)
        ones, zeros = torch.ones(BATCH, 1), torch.zeros(BATCH, 1)
        if k.skip_zero_grad not in ("all", "d"):
            d_net.zero_grad()
        err_real = criterion(d_net(real), ones)
        tr.before_backward(d_net)
        err_real.backward()
        fake = g_net(noise)
        err_fake = criterion(d_net(fake.detach()), zeros)
        err_fake.backward()
        opt_d.step()
        if k.skip_zero_grad != "all":
            g_net.zero_grad()
        err_g = criterion(d_net(fake), ones)
        err_g.backward()
        tr.after_backward(i)
        opt_g.step()
        return err_real + err_fake + err_g

    return Trainer(model, [opt_d, opt_g], run_step, k, probe)


def build_finetune(k: Knobs, probe: Probe, seed: int) -> Trainer:
    """A frozen (pretend-pretrained) backbone, frozen on purpose before watch; a new head."""
    model = nn.Sequential()
    model.add_module("backbone", nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(),
                                               nn.Linear(64, 64), nn.ReLU()))
    model.add_module("head", nn.Linear(64, CLASSES))
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                           lr=3e-3 * k.lr_scale)
    return supervised(model, opt, k, probe, _tabular_batches(seed, k),
                      lambda mdl, x, y: _classify(mdl, x, y, k), None)


def _relu_mlp(k: Knobs) -> ReluMLP:
    model = ReluMLP(k)
    if k.neg_bias:
        with torch.no_grad():
            model.fc1.bias.fill_(-10.0)
    return model


def build_accum(k: Knobs, probe: Probe, seed: int) -> Trainer:
    model = _relu_mlp(k)
    opt = _prepare(model, k, "head", lambda ps: torch.optim.SGD(
        ps, lr=0.05 * k.lr_scale, momentum=0.9))
    return supervised(model, opt, k, probe, _tabular_batches(seed, k, 8),
                      lambda mdl, x, y: _classify(mdl, x, y, k), "head", accum=4,
                      probe_point=ProbePoint(model.act1, "out", "dead"))


def build_bf16(k: Knobs, probe: Probe, seed: int) -> Trainer:
    model = _relu_mlp(k)
    opt = _prepare(model, k, "head", lambda ps: torch.optim.AdamW(ps, lr=1e-3 * k.lr_scale))
    return supervised(model, opt, k, probe, _tabular_batches(seed, k),
                      lambda mdl, x, y: _classify(mdl, x, y, k), "head", amp=torch.bfloat16,
                      probe_point=ProbePoint(model.act1, "out", "dead"))


def build_fp16(k: Knobs, probe: Probe, seed: int) -> Trainer:
    model = _relu_mlp(k)
    opt = _prepare(model, k, "head", lambda ps: torch.optim.Adam(ps, lr=1e-3 * k.lr_scale))
    scaler = torch.amp.GradScaler("cpu")
    return supervised(model, opt, k, probe, _tabular_batches(seed, k),
                      lambda mdl, x, y: _classify(mdl, x, y, k), "head", amp=torch.float16,
                      scaler=scaler, probe_point=ProbePoint(model.act1, "out", "dead"))


def build_lbfgs(k: Knobs, probe: Probe, seed: int) -> Trainer:
    model = Sequence(k)
    opt = _prepare(model, k, "linear", lambda ps: torch.optim.LBFGS(
        ps, lr=0.8 * k.lr_scale, max_iter=3, line_search_fn="strong_wolfe"))
    criterion = nn.MSELoss()

    def run_step(tr: Trainer, i: int) -> torch.Tensor:
        g = _gen(seed, i)
        phase = torch.rand(8, 1, generator=g) * 6.28
        wave = torch.sin(phase + torch.arange(9.0) * 0.7)
        x, y = float_bug(wave[:, :-1], i, k), wave[:, 1:]
        tr.see_input(x, i)

        def closure() -> torch.Tensor:
            if not k.lbfgs_zero_grad_outside:
                _zero_grad(opt, k)
            loss = criterion(model(x), y)
            tr.before_backward()
            loss.backward()
            return loss

        if k.lbfgs_zero_grad_outside:
            opt.zero_grad()
        loss = opt.step(closure)
        tr.after_backward(i)
        return loss

    return Trainer(model, [opt], run_step, k, probe, _head_params(model, "linear"))


@dataclass(frozen=True)
class Setup:
    name: str
    build: Callable[[Knobs, Probe, int], Trainer]
    caps: frozenset[str]
    what: str


def _caps(*names: str) -> frozenset[str]:
    return frozenset(("any", "zero_grad", *names))


SETUPS: tuple[Setup, ...] = (
    Setup("mlp_tanh", build_mlp_tanh,
          _caps("cut", "head", "init", "tanh", "tabular", "float_inputs", "ce"),
          "6-layer tanh MLP, Adam"),
    Setup("mnist_net", build_mnist_net,
          _caps("cut", "head", "init", "relu_probe", "images", "float_inputs", "ce"),
          "PyTorch-examples MNIST net (F.relu in forward), Adadelta lr=1"),
    Setup("resnet", build_resnet,
          _caps("cut", "head", "relu_probe", "images", "float_inputs", "ce"),
          "ResNet: BatchNorm, ReLU(inplace), out += identity; SGD momentum"),
    Setup("lstm_lm", build_lstm_lm, _caps("cut", "head", "ce"),
          "word-language-model LSTM, SGD lr=20, clip 0.25"),
    Setup("gpt2_nanogpt", build_gpt2, _caps("cut", "ce", "adamw_clip"),
          "transformers GPT-2, nanoGPT configure_optimizers, 2 micro-batches, clip 1"),
    Setup("bert", build_bert, _caps("cut", "head", "ce", "adamw_clip"),
          "transformers BertForSequenceClassification, AdamW, clip 1"),
    Setup("vit", build_vit,
          _caps("cut", "head", "images", "float_inputs", "ce", "adamw_clip"),
          "ViT (patch conv + TransformerEncoder), AdamW, clip 1"),
    Setup("vae", build_vae, _caps("cut", "relu_probe"),
          "PyTorch-examples VAE (F.relu, sigmoid decoder), Adam"),
    Setup("gan", build_gan, _caps("gan"),
          "DCGAN-style D/G loop, two Adam optimizers, ModuleDict root"),
    Setup("finetune", build_finetune, _caps("tabular", "float_inputs", "ce"),
          "frozen backbone (frozen before watch), trainable head, Adam"),
    Setup("accum", build_accum,
          _caps("cut", "head", "init", "relu_probe", "tabular", "float_inputs", "ce"),
          "ReLU MLP, 4 micro-batches per step, SGD momentum"),
    Setup("bf16", build_bf16,
          _caps("cut", "head", "init", "relu_probe", "tabular", "float_inputs", "ce"),
          "ReLU MLP under bf16 autocast, AdamW"),
    Setup("fp16_scaler", build_fp16,
          _caps("cut", "head", "init", "relu_probe", "tabular", "float_inputs", "ce"),
          "ReLU MLP under fp16 autocast + GradScaler (CPU), Adam"),
    Setup("lbfgs", build_lbfgs, _caps("lbfgs", "cut", "head", "float_inputs"),
          "time-sequence LSTM cells, LBFGS with a closure"),
)

SETUP_BY_NAME = {s.name: s for s in SETUPS}


def probe_hook(point: ProbePoint, probe: Probe, should: Callable[[], bool]) -> Any:
    """Measure the dead / saturated fraction at a probe point when `should()` says so."""

    def measure(v: torch.Tensor) -> None:
        v = v.detach().float()
        if point.measure == "dead":
            flat = v.transpose(0, 1).reshape(v.shape[1], -1) if v.dim() > 2 else v.t()
            probe.probe_frac.append(float((flat <= 0).all(1).float().mean()))
        else:
            probe.probe_frac.append(float((v.abs() > 0.99).float().mean()))

    if point.where == "in":
        return point.module.register_forward_pre_hook(
            lambda m, args: measure(args[0]) if should() else None)
    return point.module.register_forward_hook(
        lambda m, args, out: measure(out) if should() else None)


def iter_setups(names: list[str] | None) -> Iterator[Setup]:
    for s in SETUPS:
        if names is None or s.name in names:
            yield s
