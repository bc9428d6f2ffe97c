"""gradscope.checkup(): each check on a broken and a healthy case, on real architectures."""

from __future__ import annotations

import copy
import io
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models import CASES, CNN, MLP, LSTMClassifier
from torch import nn

import gradscope
from gradscope import GradscopeError
from gradscope.numbers import fmt

EARLY = ("init-loss", "gradients", "data", "depth")  # the checks of one forward/backward


def batch_of(name: str, seed: int = 0):
    """(batch, loss_fn) of a test case: (x, y) with cross-entropy, or an HF dict batch."""
    b = CASES[name].batches(1, seed)[0]
    if name == "gpt2":
        return {"input_ids": b["input_ids"], "labels": b["input_ids"]}, None
    if name == "bert":
        return {"input_ids": b["input_ids"], "labels": b["labels"]}, None
    return (b["x"], b["y"]), F.cross_entropy


def build(name: str) -> nn.Module:
    if name in ("gpt2", "bert"):
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    return CASES[name].build()


def run(model: nn.Module, batch, loss_fn, lr: float = 1e-3, optimizer=None, **options):
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    return gradscope.checkup(model, batch, loss_fn, opt, **options)


def signs(ck, severities=("warning", "error")) -> set[str]:
    return {d.sign for d in ck.diagnoses if d.severity in severities}


def causes(ck) -> set[str]:
    return {c.id for d in ck.diagnoses for c in d.causes}


# ------------------------------------------------------------------ healthy architectures
@pytest.mark.parametrize("name", ["mlp", "cnn", "lstm", "gpt2", "bert"])
def test_healthy_architectures_pass_every_check_without_a_warning(name):
    model = build(name)
    batch, loss_fn = batch_of(name)
    ck = run(model, batch, loss_fn, quick=True)
    assert [r.name for r in ck.results] == list(gradscope.checklist.CHECK_TITLES)
    assert ck.ok, ck.report(file=io.StringIO())
    assert all(r.status == "ok" for r in ck.results), [(r.name, r.status) for r in ck.results]
    # the reference of check 1 is ln C for the task's classes (GPT-2: its 100-token vocabulary)
    classes = 100 if name == "gpt2" else 3
    init = ck["init-loss"].data
    assert init["reference"] == pytest.approx(math.log(classes), rel=1e-6)
    assert abs(init["loss"] - init["reference"]) < 0.3
    assert ck["overfit"].data["losses"][-1] < ck["overfit"].data["losses"][0]
    lr = ck["lr-range"].data
    assert lr["start"] is not None and lr["start"] < lr["diverge"]


# ------------------------------------------------------------------ check 1: loss at init
@pytest.mark.parametrize("name,head", [("mlp", "head"), ("cnn", "fc"), ("lstm", "head")])
def test_init_loss_far_above_chance_points_at_initialisation(name, head):
    model = build(name)
    with torch.no_grad():
        getattr(model, head).weight.mul_(100.0)
    ck = run(model, *batch_of(name), checks=EARLY)
    found = [d for d in ck.diagnoses if d.sign == "loss-init-off"]
    assert found and found[0].cause == "poor-init"
    assert found[0].evidence["loss"] > math.log(3) + 1.0
    assert found[0].evidence["output_std"] > 1.0


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_init_loss_far_off_on_transformers(name):
    model = build(name)
    head = model.lm_head if name == "gpt2" else model.classifier
    with torch.no_grad():
        head.weight.mul_(200.0)  # GPT-2: the tied embedding too
    ck = run(model, *batch_of(name), checks=EARLY)
    assert "loss-init-off" in signs(ck)
    assert ck["init-loss"].status == "warning"


def test_regression_reference_is_the_target_variance_and_an_offset_points_at_data_scale():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    x = torch.randn(32, 8)
    y = torch.randn(32, 1)
    healthy = run(model, (x, y), F.mse_loss, checks=EARLY)
    assert healthy.ok
    assert healthy["init-loss"].data["reference"] == pytest.approx(
        float(y.var(unbiased=False)), rel=1e-5)
    offset = run(model, (x, y + 50.0), F.mse_loss, checks=EARLY)
    found = [d for d in offset.diagnoses if d.sign == "loss-init-off"]
    assert found and found[0].cause == "data-scale"


def test_binary_cross_entropy_reference_is_ln2():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32, 1)).float()
    ck = run(model, (x, y), F.binary_cross_entropy_with_logits, checks=EARLY)
    assert ck.ok
    assert ck["init-loss"].data["kind"] == "binary-cross-entropy"
    assert ck["init-loss"].data["reference"] == pytest.approx(math.log(2))


class EndsIn(nn.Module):
    """A test-case model with a final softmax or sigmoid appended to its outputs."""

    def __init__(self, inner: nn.Module, last) -> None:
        super().__init__()
        self.inner, self.last = inner, last

    def forward(self, *args, **kwargs):
        return self.last(self.inner(*args, **kwargs))


def _mismatch(ck) -> list:
    return [d for d in ck.diagnoses if d.cause == "probabilities-as-logits"]


@pytest.mark.parametrize("name", ["mlp", "cnn", "lstm"])
def test_softmax_before_cross_entropy_is_found(name):
    model = EndsIn(build(name), lambda out: out.softmax(-1))
    ck = run(model, *batch_of(name), checks=EARLY)
    found = _mismatch(ck)
    assert found and found[0].severity == "warning" and "softmax" in found[0].checks[0]
    assert 0.0 <= found[0].evidence["output_min"] <= found[0].evidence["output_max"] <= 1.0


@pytest.mark.parametrize("loss_fn, last", [
    (F.cross_entropy, None),  # logits: what cross_entropy takes
    (F.nll_loss, lambda out: out.log_softmax(-1)),  # log-probabilities into NLL
    (lambda p, y: -p.gather(1, y[:, None]).log().mean(), lambda out: out.softmax(-1)),
], ids=["logits", "log-softmax-nll", "hand-written-nll-of-probabilities"])
def test_outputs_of_the_form_the_loss_takes_are_not_flagged(loss_fn, last):
    model = build("mlp") if last is None else EndsIn(build("mlp"), last)
    (x, y), _ = batch_of("mlp")
    ck = run(model, (x, y), loss_fn, checks=EARLY)
    assert not _mismatch(ck) and ck["init-loss"].status == "ok"


def test_sigmoid_before_a_logit_binary_loss_is_found_and_before_bce_is_not():
    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32, 1)).float()
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1), nn.Sigmoid())
    broken = run(net, (x, y), F.binary_cross_entropy_with_logits, checks=EARLY)
    assert _mismatch(broken) and "sigmoid" in _mismatch(broken)[0].checks[0]
    assert not _mismatch(run(net, (x, y), F.binary_cross_entropy, checks=EARLY))


def test_init_loss_below_chance_points_at_leaking_labels():
    torch.manual_seed(0)
    y = torch.randint(0, 3, (16,))
    x = torch.cat([torch.randn(16, 5), 20.0 * F.one_hot(y, 3).float()], dim=1)

    class Leaky(nn.Module):  # a classifier whose inputs carry the answer
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return x[:, 5:] + 0.01 * self.fc(x)

    ck = run(Leaky(), (x, y), F.cross_entropy, checks=EARLY)
    assert [d.cause for d in ck.diagnoses if d.sign == "loss-init-off"] == ["label-leak"]


# ------------------------------------------------------------------ check 2: forward/backward
class DetachedMLP(MLP):
    def forward(self, x):
        x = self.act1(self.fc1(x)).detach()  # the path to fc1 is cut here
        return self.head(self.act2(self.fc2(self.drop(x))))


class NumpyMLP(MLP):
    def forward(self, x):
        h = self.act1(self.fc1(x))
        h = torch.from_numpy(h.detach().numpy() * 1.0)  # a round-trip through numpy
        return self.head(self.act2(self.fc2(self.drop(h))))


class UnusedBranchCNN(CNN):
    def __init__(self):
        super().__init__()
        self.aux = nn.Linear(4, 3)  # built, never called


class DataLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight.data, self.bias)  # .data drops the weight from the graph


class DataWeightLSTM(LSTMClassifier):
    def __init__(self):
        super().__init__()
        self.head = DataLinear(12, 3)


def test_detached_path_is_named_with_where_it_is_cut():
    torch.manual_seed(0)
    ck = run(DetachedMLP(), *batch_of("mlp"), checks=EARLY)
    found = [d for d in ck.diagnoses if d.sign == "grad-none"]
    assert found and found[0].layers == ["fc1"] and found[0].cause == "detached-graph"
    assert "fc1.weight" in found[0].causes[0].evidence
    assert "cut before 'drop'" in found[0].causes[0].evidence


def test_numpy_round_trip_is_found():
    torch.manual_seed(0)
    ck = run(NumpyMLP(), *batch_of("mlp"), checks=EARLY)
    found = [d for d in ck.diagnoses if d.sign == "grad-none"]
    assert found and found[0].layers == ["fc1"]
    assert "numpy" in found[0].causes[0].evidence


def test_unused_branch_in_a_cnn_is_named():
    torch.manual_seed(0)
    ck = run(UnusedBranchCNN(), *batch_of("cnn"), checks=EARLY)
    found = [d for d in ck.diagnoses if d.sign == "grad-none"]
    assert found and found[0].layers == ["aux"]
    assert "never ran in the forward pass" in found[0].causes[0].evidence


def test_parameter_used_through_data_in_an_lstm():
    torch.manual_seed(0)
    ck = run(DataWeightLSTM(), *batch_of("lstm"), checks=EARLY)
    found = [d for d in ck.diagnoses if d.sign == "grad-none"]
    assert found and found[0].layers == ["head"]
    evidence = found[0].causes[0].evidence
    assert "head.weight" in evidence and "head.bias" not in evidence and ".data" in evidence


class NoGrad(nn.Module):
    """Runs the wrapped module under torch.no_grad()."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.inner(*args, **kwargs)


def test_gpt2_block_under_no_grad_is_named():
    model = build("gpt2")
    model.transformer.h[0] = NoGrad(model.transformer.h[0])
    ck = run(model, *batch_of("gpt2"), checks=EARLY)
    found = [d for d in ck.diagnoses if d.sign == "grad-none"]
    assert found and found[0].severity == "warning"  # the rest of the model still trains
    layers = found[0].layers
    # the block, and the position embedding that feeds the loss only through it
    assert set(layers) == {"transformer.wpe"} | {
        name for name, m in model.named_modules() if name.startswith("transformer.h.0.")
        and any(True for _ in m.parameters(recurse=False))}
    evidence = found[0].causes[0].evidence
    assert "'transformer.h.0.inner.ln_1' ran under torch.no_grad()" in evidence
    assert ("output of 'transformer.wpe' never reaches the loss: the path is cut at "
            "'transformer.h.0" in evidence)


def test_frozen_layers_are_info_and_missing_from_optimizer_is_a_warning():
    model = build("bert")
    model.bert.pooler.requires_grad_(False)
    ck = run(model, *batch_of("bert"), quick=True, checks=("gradients", "overfit"))
    assert ck.ok  # freezing on purpose is not a problem
    assert any(c.id == "frozen-on-purpose" for d in ck.diagnoses for c in d.causes)
    torch.manual_seed(0)
    mlp = MLP()
    opt = torch.optim.Adam([p for n, p in mlp.named_parameters() if not n.startswith("head")])
    ck = run(mlp, *batch_of("mlp"), optimizer=opt, quick=True, checks=("gradients", "overfit"))
    found = [d for d in ck.diagnoses if d.sign == "params-frozen" and d.severity == "warning"]
    assert found and found[0].cause == "missing-from-optimizer" and found[0].layers == ["head"]


def test_all_parameters_frozen_or_detached_loss_is_an_error():
    torch.manual_seed(0)
    model = MLP().requires_grad_(False)
    ck = gradscope.checkup(model, *batch_of("mlp"))
    assert "grad-none" in signs(ck, ("error",))
    assert ck["overfit"].status == "skipped" and ck["lr-range"].status == "skipped"
    model = MLP()
    ck = gradscope.checkup(model, batch_of("mlp")[0],
                           lambda out, y: F.cross_entropy(out.detach(), y))
    assert [d.cause for d in ck.diagnoses if d.sign == "grad-none"] == ["detached-graph"]


def test_nonfinite_gradients_are_an_error():
    class LogMLP(MLP):
        def forward(self, x):
            return super().forward(x).log()  # log of negative logits: NaN

    torch.manual_seed(0)
    ck = run(LogMLP(), *batch_of("mlp"), checks=EARLY)
    assert "values-nonfinite" in signs(ck, ("error",))


# ------------------------------------------------------------------ check 3: data
def test_raw_pixels_into_a_cnn():
    torch.manual_seed(0)
    (x, y), loss_fn = batch_of("cnn")
    pixels = (x * 60 + 128).clamp(0, 255).round()
    ck = run(CNN(), (pixels, y), loss_fn, checks=EARLY)
    found = [d for d in ck.diagnoses if d.sign == "data-suspect"]
    assert found and found[0].cause == "data-scale" and "0..255" in found[0].summary


def test_unnormalised_features_nan_inputs_and_duplicates_into_an_mlp():
    torch.manual_seed(0)
    (x, y), loss_fn = batch_of("mlp")
    ck = run(MLP(), (x * 1000, y), loss_fn, checks=EARLY)
    assert [d.cause for d in ck.diagnoses if d.sign == "data-suspect"] == ["data-scale"]
    bad = x.clone()
    bad[3, 2] = float("nan")
    ck = run(MLP(), (bad, y), loss_fn, checks=EARLY)
    found = [d for d in ck.diagnoses if d.sign == "data-suspect"]
    assert found[0].severity == "error" and found[0].cause == "data-nonfinite"
    ck = run(MLP(), (x[:1].expand(16, 8).clone(), y), loss_fn, checks=EARLY)
    assert "data-duplicates" in causes(ck)


def test_constant_targets_in_an_lstm_batch():
    torch.manual_seed(0)
    x = torch.randn(8, 5, 6)
    ck = run(LSTMClassifier(), (x, torch.zeros(8, dtype=torch.long)), F.cross_entropy,
             checks=EARLY)
    assert [d.cause for d in ck.diagnoses if d.sign == "data-suspect"] == ["data-labels"]


def test_labels_out_of_range_stop_the_checkup_with_an_error():
    torch.manual_seed(0)
    (x, y), loss_fn = batch_of("mlp")
    y = y.clone()
    y[0] = 7
    ck = run(MLP(), (x, y), loss_fn)
    found = [d for d in ck.diagnoses if d.sign == "data-suspect"]
    assert found[0].severity == "error" and "labels reach 7" in found[0].summary
    assert [r.status for r in ck.results].count("skipped") == 5


@pytest.mark.parametrize("name,shift,classes", [("bert", 3, 3), ("gpt2", 100, 100)])
def test_labels_out_of_range_on_transformers_are_caught_before_the_forward(name, shift,
                                                                            classes):
    model = build(name)
    batch, _ = batch_of(name)
    batch = {**batch, "labels": batch["labels"] + shift}
    ck = run(model, batch, None)
    assert ck["data"].status == "error" and f"{classes} classes" in ck["data"].summary
    assert ck["overfit"].status == "skipped"


def test_binary_targets_outside_unit_range():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 1))
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32, 1)).float()
    ck = run(model, (x, y * 2), F.binary_cross_entropy_with_logits, checks=EARLY)
    assert ck["init-loss"].data["kind"] == "binary-cross-entropy"
    found = [d for d in ck.diagnoses if d.sign == "data-suspect"]
    assert found[0].severity == "error" and found[0].cause == "data-labels"
    assert "binary targets must lie in [0, 1]" in found[0].summary
    assert run(model, (x, y), F.binary_cross_entropy_with_logits, checks=EARLY).ok
    # an MSE on the same targets is a regression: no label range
    assert run(model, (x, y * 2), F.mse_loss, checks=EARLY)["init-loss"].data["kind"] == \
        "regression"


def test_integer_inputs_into_float_layers():
    torch.manual_seed(0)
    (x, y), loss_fn = batch_of("mlp")
    ints = (x * 10).long()
    with pytest.raises(GradscopeError, match=r"no embedding layer: cast them with \.float\(\)"):
        run(MLP(), (ints, y), loss_fn)

    class Casting(MLP):
        def forward(self, x):
            return super().forward(x.float())

    ck = run(Casting(), (ints, y), loss_fn, checks=EARLY)
    assert "data-dtype" in causes(ck)


# ------------------------------------------------------------------ check 4: depth
def _deep(act: type[nn.Module], gain: float, depth: int = 8, width: int = 32) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(8, width), act()]
    for _ in range(depth):
        layers += [nn.Linear(width, width), act()]
    layers.append(nn.Linear(width, 3))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=gain / math.sqrt(m.in_features))
                m.bias.zero_()
    return model


def test_saturated_tanh_stack_and_shrinking_signal():
    batch = batch_of("mlp")
    saturated = run(_deep(nn.Tanh, 6.0), *batch, checks=EARLY)
    assert "activations-saturated" in signs(saturated)
    shrinking = run(_deep(nn.Tanh, 0.3), *batch, checks=EARLY)
    found = [d for d in shrinking.diagnoses if d.sign == "activations-scale"]
    assert found and found[0].cause == "poor-init" and found[0].evidence["factor"] < 1e-2
    healthy = run(_deep(nn.Tanh, 1.0), *batch, checks=EARLY)
    assert healthy.ok, healthy.report(file=io.StringIO())


def test_dead_relus_in_a_cnn_and_their_zero_gradients():
    torch.manual_seed(0)
    model = CNN()
    with torch.no_grad():
        model.bn.bias.fill_(-10.0)  # every unit after the stem is negative: ReLU outputs 0
    ck = run(model, *batch_of("cnn"), quick=True, checks=("depth", "gradients", "overfit"))
    dead = [d for d in ck.diagnoses if d.sign == "units-dead"]
    assert dead and "relu" in dead[0].layers and dead[0].cause == "poor-init"
    stalled = [d for d in ck.diagnoses if d.sign == "layers-stalled"]
    assert stalled and "stem" in stalled[0].layers


class ProjectedLSTM(LSTMClassifier):
    """An LSTM behind a tanh input projection."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.squash = nn.Tanh()

    def forward(self, x):
        return super().forward(self.squash(self.proj(x)))


def test_saturated_input_projection_of_an_lstm():
    torch.manual_seed(0)
    healthy = run(ProjectedLSTM(), *batch_of("lstm"), checks=EARLY)
    assert healthy.ok
    model = ProjectedLSTM()
    with torch.no_grad():
        model.proj.weight.mul_(50.0)
    ck = run(model, *batch_of("lstm"), checks=EARLY)
    found = [d for d in ck.diagnoses if d.sign == "activations-saturated"]
    assert found and found[0].layers == ["squash"]


def test_vanishing_gradients_through_a_sigmoid_stack():
    ck = run(_deep(nn.Sigmoid, 1.0, depth=10), *batch_of("mlp"), checks=EARLY)
    found = [d for d in ck.diagnoses if d.sign == "grad-vanishing"]
    assert found and found[0].evidence["ratio"] < 1e-3
    assert found[0].evidence["first_layer_grad_norm"] < 1e-4


# ------------------------------------------------------------------ checks 5 and 6
def test_tiny_learning_rate_cannot_overfit_and_the_range_test_says_why():
    model = build("mlp")
    ck = run(model, *batch_of("mlp"), lr=1e-8, quick=True)
    found = [d for d in ck.diagnoses if d.sign == "loss-flat"]
    assert found and found[0].cause == "lr-too-low"
    lr = ck["lr-range"].data
    assert lr["user_lr"] == 1e-8 and lr["start"] > 1e-6
    assert f"yours is {fmt(1e-8)}" in ck["lr-range"].summary  # the number style of every report


def test_gpt2_with_a_tiny_learning_rate():
    model = build("gpt2")
    ck = run(model, *batch_of("gpt2"), lr=1e-9, quick=True)
    assert [d.cause for d in ck.diagnoses if d.sign == "loss-flat"] == ["lr-too-low"]


def test_learning_rate_past_divergence():
    model = build("cnn")
    opt = torch.optim.SGD(model.parameters(), lr=50.0)
    ck = run(model, *batch_of("cnn"), optimizer=opt, quick=True)
    assert "lr-too-high" in {d.cause for d in ck.diagnoses if d.sign == "training-unstable"}
    assert ck["overfit"].status in ("warning", "error")


def test_bert_memorises_and_the_sweep_marks_the_users_rate():
    model = build("bert")
    ck = run(model, *batch_of("bert"), lr=1e-3)
    overfit = ck["overfit"].data
    assert overfit["memorised_at"] is not None and overfit["losses"][-1] < 0.1 * overfit[
        "losses"][0]
    lr = ck["lr-range"].data
    assert lr["start"] < lr["steepest"] < lr["diverge"]
    assert ck.ok


def test_landmarks_on_a_known_curve():
    from gradscope.checklist.lr_range import Sweep, landmarks

    lrs = np.geomspace(1e-6, 1.0, 13).tolist()
    losses = [2.0, 2.0, 2.0, 1.85, 1.6, 1.0, 0.5, 0.3, 0.25, 0.3, 1.5, 3.5, float("nan")]
    marks = landmarks(Sweep(lrs, losses))
    assert marks["start"] == lrs[3]  # first below 95% of 2.0 (running median of 3)
    assert marks["steepest"] in (lrs[5], lrs[6])
    assert marks["diverge"] == lrs[12]


# ------------------------------------------------------------------ isolation
def _train(model, opt, batches, loss_fn):
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return losses


@pytest.mark.parametrize("name", ["cnn", "gpt2"])
def test_training_after_a_checkup_is_bit_identical(name):
    if name == "gpt2":
        pytest.importorskip("transformers")
        from models import lm_loss

        def loss_fn(out, y):
            return out

        def step_batches(case):
            return [(b, None) for b in case.batches(3, seed=1)]

        def forward(model, b):
            return lm_loss(model, b)
    runs = []
    for with_checkup in (False, True):
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        model = CASES[name].build()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        batches = CASES[name].batches(4, seed=1)
        first = batches[0]
        opt.zero_grad()  # one step first: the optimizer has state, the model has .grad
        CASES[name].loss(model, first).backward()
        opt.step()
        before = copy.deepcopy(model.state_dict())
        grads = [p.grad.clone() for p in model.parameters()]
        opt_state = copy.deepcopy(opt.state_dict())
        if with_checkup:
            batch, loss_fn = batch_of(name)
            ck = gradscope.checkup(model, batch, loss_fn, opt, quick=True)
            assert ck["overfit"].data["losses"]
            for key, value in model.state_dict().items():
                assert torch.equal(value, before[key]), key
            assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
            assert str(opt.state_dict()) == str(opt_state)
        losses = []
        for b in batches[1:]:
            opt.zero_grad()
            loss = CASES[name].loss(model, b)  # dropout draws from the global RNG
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        runs.append((losses, model.state_dict(), torch.rand(3), np.random.rand(3),
                     random.random()))
    (la, sa, ta, na, ra), (lb, sb, tb, nb, rb) = runs
    assert all(torch.equal(a, b) for a, b in zip(la, lb))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(ta, tb) and np.array_equal(na, nb) and ra == rb


def test_checkup_of_a_watched_model_leaves_its_scope_alone():
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.Adam(model.parameters())
    with gradscope.watch(model, opt, every=1) as scope:
        ck = run(model, *batch_of("mlp"), optimizer=opt, quick=True)
        assert scope.step_count == 0 and scope.history.total_recorded == 0
        (x, y), loss_fn = batch_of("mlp")
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        scope.step(loss)
    assert scope.history.total_recorded == 1
    assert ck.ok


# ------------------------------------------------------------------ results, report, plot
def test_report_and_plot(tmp_path):
    torch.manual_seed(0)
    ck = run(DetachedMLP(), *batch_of("mlp"), quick=True)
    text = ck.report(file=io.StringIO(), width=100)
    lines = text.splitlines()
    assert lines[0] == "gradscope checkup"
    table = text.split("finding")[0]
    for title in gradscope.checklist.CHECK_TITLES.values():
        assert title in table, title
    assert "grad-none" in text and "detached-graph" in text
    assert all(len(line) <= 100 for line in lines)
    path = ck.plot(tmp_path / "checkup.png")
    assert path.stat().st_size > 20_000
    with pytest.raises(GradscopeError, match="use a file name ending in"):
        ck.plot(tmp_path / "checkup.txt")
    assert len(ck.plot().axes) == 4  # no path: the figure itself
    assert set(ck.times) == set(gradscope.checklist.CHECK_TITLES)
    assert all(d.first_step == 0 and d.rule for d in ck.diagnoses)


def test_healthy_report_says_so():
    torch.manual_seed(0)
    ck = run(MLP(), *batch_of("mlp"), checks=EARLY)
    text = ck.report(file=io.StringIO())
    assert "No problems found" in text
    assert text.count("skipped: not requested") == 2


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("args,kwargs,message", [
    (("model", None), {}, "needs a torch.nn.Module"),
    ((None, torch.zeros(2, 8)), {}, "a single tensor"),
    ((None, (torch.zeros(2, 8),)), {}, "a tuple of 1 items"),
    ((None, (torch.zeros(2, 8), torch.zeros(2).long())), {}, "no loss_fn"),
    ((None, {"x": torch.zeros(2, 8)}, F.cross_entropy), {}, "dict batch and a loss_fn"),
    ((None, {}), {}, "empty dict"),
    ((None, (torch.zeros(2, 8), torch.zeros(2).long()), "ce"), {}, "as loss_fn"),
    ((None, (torch.zeros(2, 8), torch.zeros(2).long()), F.cross_entropy, "adam"), {},
     "expected a torch.optim.Optimizer"),
    ((None, (torch.zeros(2, 8), torch.zeros(2).long()), F.cross_entropy), {"checks": ["x"]},
     "unknown check"),
    ((None, (torch.zeros(2, 8), torch.zeros(2).long()), F.cross_entropy),
     {"overfit_steps": 0}, "at least 2"),
    ((None, (torch.zeros(2, 8), torch.zeros(2, 3)), lambda o, y: (o - y) ** 2), {},
     "must be a scalar tensor"),
])
def test_bad_input_gets_one_clear_sentence(args, kwargs, message):
    model = MLP()
    args = tuple(model if a is None else a for a in args[:1]) + args[1:]
    with pytest.raises(GradscopeError, match=message) as err:
        gradscope.checkup(*args, **kwargs)
    assert "\n" not in str(err.value) and str(err.value).endswith(".")


def test_model_without_a_loss_for_a_dict_batch():
    model = nn.Sequential(nn.Linear(8, 3))

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return {"logits": self.inner(x)}

    with pytest.raises(GradscopeError, match="without a loss for the dict batch"):
        gradscope.checkup(Wrapped(), {"x": torch.zeros(2, 8)})


def test_optimizer_of_another_model():
    with pytest.raises(GradscopeError, match="holds none of the model's parameters"):
        gradscope.checkup(MLP(), *batch_of("mlp"), torch.optim.SGD(MLP().parameters(), lr=1))


def test_demo_checkup_command(tmp_path, capsys):
    from gradscope.cli import main

    out = tmp_path / "demo.png"
    assert main(["demo", "checkup", "-o", str(out), "--fail-on", "warning"]) == 1
    text = capsys.readouterr().out
    assert text.startswith("gradscope checkup") and f"plot saved to {out}" in text
    for sign in ("loss-init-off", "grad-none", "data-suspect", "loss-flat"):
        assert sign in text, sign
    assert out.stat().st_size > 20_000


SETUP = '''
import torch
from torch import nn


def setup(lr=1e-3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    batch = (torch.randn(16, 8), torch.randint(0, 3, (16,)))
    return model, batch, nn.functional.cross_entropy, torch.optim.Adam(model.parameters(), lr)


def broken():
    return dict(zip(("model", "batch", "loss_fn", "optimizer"), setup(lr=1e-9)))
'''


def test_checkup_command_on_a_setup_function(tmp_path, capsys):
    from gradscope.cli import main

    (tmp_path / "mysetup.py").write_text(SETUP)
    target = str(tmp_path / "mysetup.py")
    assert main(["checkup", f"{target}:setup", "--quick", "--plot",
                 str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("gradscope checkup") and "No problems found" in out
    assert (tmp_path / "c.png").exists()
    assert main(["checkup", f"{target}:broken", "--quick", "--width", "100"]) == 1
    assert "lr-too-low" in capsys.readouterr().out
    for bad, message in ((f"{target}", "cannot read TARGET"),
                         (f"{target}:missing", "has no function 'missing'"),
                         ("no_such_module_xyz:setup", "cannot import")):
        assert main(["checkup", bad]) == 2
        assert message in capsys.readouterr().err


def test_range_test_is_not_fooled_by_dropout_noise_on_a_small_batch():
    # a CNN with dropout on a batch of 4 under SGD: its loss jumps by ~10% from step to step
    # at learning rates too small to change anything; neither a fall nor a divergence there
    torch.manual_seed(3)
    model = CNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    (x, y), loss_fn = batch_of("cnn", seed=3)
    ck = gradscope.checkup(model, (x, y), loss_fn, opt, checks=["lr-range"])
    lr = ck["lr-range"].data
    assert lr["start"] > 1e-4 and (lr["diverge"] is None or lr["diverge"] > 0.05)
    assert ck.ok


def test_saturated_bert_pooler_and_a_gpt2_whose_final_norm_starts_at_zero():
    bert = build("bert")
    with torch.no_grad():
        bert.bert.pooler.dense.weight.mul_(100.0)  # tanh pooler pushed to +-1
    ck = run(bert, *batch_of("bert"), checks=EARLY)
    found = [d for d in ck.diagnoses if d.sign == "activations-saturated"]
    assert found and found[0].layers == ["bert.pooler.activation"]
    gpt2 = build("gpt2")
    with torch.no_grad():
        gpt2.transformer.ln_f.weight.zero_()  # nothing before the final norm gets a gradient
    ck = run(gpt2, *batch_of("gpt2"), checks=EARLY)
    found = [d for d in ck.diagnoses if d.sign == "grad-vanishing"]
    assert found and found[0].evidence["ratio"] < 1e-3
