"""Bugs of the training loop itself, on models the rules were not written for: probabilities
fed to a loss that applies its own softmax, gradients not cleared by one of a GAN's two
optimizers, LBFGS with zero_grad() outside its closure."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import CNN, LSTMClassifier, gpt2
from tolerance import model_norm_rtol
from torch import nn

import gradscope
from gradscope.options import WatchOptions
from gradscope.rules.engine import RuleEngine
from gradscope.runlog import read_log
from gradscope.signals.loss_graph import activation_before_logit_loss


# ----------------------------------------------------------------------- the loss's graph
@pytest.mark.parametrize("make, expected", [
    (lambda z, y: F.cross_entropy(z.softmax(-1), y), "softmax"),
    (lambda z, y: nn.CrossEntropyLoss(label_smoothing=0.1)(z.softmax(-1).view(2, 2, 5)
                                                         .reshape(4, 5), y), "softmax"),
    (lambda z, y: F.binary_cross_entropy_with_logits(torch.sigmoid(z), F.one_hot(y, 5).float()),
     "sigmoid"),
    (lambda z, y: F.cross_entropy(z, y), None),
    (lambda z, y: F.nll_loss(F.log_softmax(z, -1), y), None),
    (lambda z, y: F.nll_loss(z.softmax(-1).log(), y), None),  # written for probabilities
    (lambda z, y: F.binary_cross_entropy(torch.sigmoid(z), F.one_hot(y, 5).float()), None),
    (lambda z, y: 0.5 * F.cross_entropy(z.softmax(-1), y) / 2 + z.pow(2).mean(), "softmax"),
])
def test_the_graph_tells_probabilities_fed_to_a_logit_loss(make, expected):
    z = torch.randn(4, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    assert activation_before_logit_loss(make(z, y)) == expected
    assert activation_before_logit_loss(make(z, y).detach()) is None
    assert activation_before_logit_loss(1.0) is None


def test_the_floor_named_is_the_lowest_cross_entropy_of_probability_rows():
    # the best a probability row can do as logits: its target entry 1, the others 0
    for classes in (2, 5, 10, 100):
        best = torch.zeros(1, classes)
        best[0, 0] = 1.0
        loss = float(F.cross_entropy(best.double(), torch.tensor([0])))
        assert loss == pytest.approx(math.log1p((classes - 1) / math.e), rel=1e-12)
        rows = torch.rand(256, classes, dtype=torch.float64).softmax(-1)
        assert float(F.cross_entropy(rows, torch.zeros(256, dtype=torch.long),
                                     reduction="none").min()) >= loss


# ----------------------------------------------------------------------- softmax before the loss
def _classify(model: nn.Module, shape: tuple[int, ...], steps: int, softmax: bool,
              every: int = 10, in_model: bool = False, loss_fn=None) -> gradscope.Scope:
    torch.manual_seed(0)
    if in_model:
        model = nn.Sequential(model, nn.Softmax(-1))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(math.prod(shape[1:]), 3, generator=gen)
    scope = gradscope.watch(model, opt, every=every, live=False)
    for _ in range(steps):
        x = torch.randn(shape, generator=gen)
        y = (x.flatten(1) @ teacher).argmax(-1)
        out = model(x)
        if softmax and not in_model:
            out = out.softmax(-1)
        loss = (loss_fn or F.cross_entropy)(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        scope.step(loss)
    scope.close()
    return scope


def _by_sign(scope: gradscope.Scope) -> dict[str, gradscope.Diagnosis]:
    return {d.sign: d for d in scope.diagnose()}


@pytest.mark.parametrize("build, shape", [(CNN, (4, 1, 8, 8)), (LSTMClassifier, (4, 5, 6))])
@pytest.mark.parametrize("in_model", [False, True])
def test_softmax_before_cross_entropy_is_named_within_three_records(build, shape, in_model):
    scope = _classify(build(), shape, 30, softmax=True, in_model=in_model)
    found = _by_sign(scope)
    assert "loss-flat" in found, sorted(found)
    diagnosis = found["loss-flat"]
    assert diagnosis.cause == "probabilities-as-logits"
    assert diagnosis.evidence["loss_floor"] == pytest.approx(math.log1p(2 / math.e))
    assert diagnosis.first_step <= 20
    assert "softmax" in diagnosis.summary


@pytest.mark.parametrize("build, shape", [(CNN, (4, 1, 8, 8)), (LSTMClassifier, (4, 5, 6))])
def test_logits_and_a_loss_written_for_probabilities_are_not_flagged(build, shape):
    healthy = _by_sign(_classify(build(), shape, 30, softmax=False))
    assert "loss-flat" not in healthy or healthy["loss-flat"].cause != "probabilities-as-logits"

    def nll_of_probabilities(p, y):
        return F.nll_loss(p.clamp_min(1e-12).log(), y)

    own = _classify(build(), shape, 30, softmax=True, in_model=True, loss_fn=nll_of_probabilities)
    assert all(d.cause != "probabilities-as-logits" for d in own.diagnose())


def test_softmax_on_a_transformer_lm_and_replay_from_the_log(tmp_path):
    torch.manual_seed(0)
    model = gpt2()
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(0)
    scope = gradscope.watch(model, opt, live=False, log_dir=tmp_path)
    for _ in range(30):
        ids = torch.randint(0, 100, (4, 12), generator=gen)
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].softmax(-1).reshape(-1, 100), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        scope.step(loss)
    scope.close()
    live = _by_sign(scope)["loss-flat"]
    assert live.cause == "probabilities-as-logits"
    assert live.evidence["classes"] == 100
    engine = RuleEngine.from_options(WatchOptions())
    read_log(tmp_path).replay(engine, capacity=scope.options.history_size)
    replayed = {d.sign: d for d in engine.diagnoses()}
    assert replayed["loss-flat"].cause == "probabilities-as-logits"
    assert replayed["loss-flat"].summary == live.summary


# ----------------------------------------------------------------------- GAN and LBFGS
def _gan(clear_d: bool, steps: int = 40, log_dir=None) -> gradscope.Scope:
    """The DCGAN example's loop on a ModuleDict root (D on real, D on fake, then G)."""
    torch.manual_seed(0)
    net_g = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))
    net_d = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1), nn.Sigmoid())
    opt_g = torch.optim.Adam(net_g.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(net_d.parameters(), 2e-4, betas=(0.5, 0.999))
    bce = nn.BCELoss()
    gen = torch.Generator().manual_seed(1)
    scope = gradscope.watch(nn.ModuleDict({"G": net_g, "D": net_d}), [opt_d, opt_g], live=False,
                            log_dir=log_dir)
    for _ in range(steps):
        real = torch.randn(32, 2, generator=gen) * 0.5 + 2
        if clear_d:
            net_d.zero_grad()
        err_real = bce(net_d(real), torch.ones(32, 1))
        err_real.backward()
        fake = net_g(torch.randn(32, 4, generator=gen))
        err_fake = bce(net_d(fake.detach()), torch.zeros(32, 1))
        err_fake.backward()
        opt_d.step()
        net_g.zero_grad()
        err_g = bce(net_d(fake), torch.ones(32, 1))  # also adds into D's gradients
        err_g.backward()
        opt_g.step()
        scope.step(err_real + err_fake + err_g)
    scope.close()
    return scope


def test_a_gan_missing_one_zero_grad_is_caught_and_the_healthy_loop_is_not(tmp_path):
    scope = _gan(clear_d=False, log_dir=tmp_path)
    broken = _by_sign(scope)
    assert broken["grad-accumulating"].cause == "missing-zero-grad"
    assert broken["grad-accumulating"].first_step <= 20
    assert "grad-accumulating" not in _by_sign(_gan(clear_d=True))
    # the replayed log knows there were two optimizers, and gives the live diagnoses
    log = read_log(tmp_path)
    assert log.layout.static("optimizers", lambda: 0) == 2
    engine = RuleEngine.from_options(WatchOptions())
    log.replay(engine, capacity=scope.options.history_size)
    assert [(d.sign, d.cause, d.first_step) for d in engine.diagnoses()] == [
        (d.sign, d.cause, d.first_step) for d in scope.diagnose()]


def _lbfgs(zero_inside: bool, steps: int = 25, micro: int = 1, watch: bool = True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3,
                            line_search_fn="strong_wolfe")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=gen)
    y = x.sum(1, keepdim=True).sin()
    scope = gradscope.watch(model, opt, live=False) if watch else None
    for _ in range(steps):
        def closure():
            if zero_inside:
                opt.zero_grad()
            total = 0.0
            for part in range(micro):  # micro-batches: several backward calls per evaluation
                loss = F.mse_loss(model(x[part::micro]), y[part::micro]) / micro
                loss.backward()
                total = total + loss.detach()
            return total

        if not zero_inside:
            opt.zero_grad()
        loss = opt.step(closure)
        if scope is not None:
            scope.step(loss)
    if scope is None:
        return model
    scope.close()
    return scope


def test_lbfgs_gradients_are_read_after_the_closure_and_clearing_outside_it_is_caught():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        healthy = _lbfgs(zero_inside=True)
        broken = _lbfgs(zero_inside=False)
    assert not [d for d in healthy.diagnose() if d.severity in ("warning", "error")]
    found = _by_sign(broken)
    assert "grad-none" not in found  # the gradients exist: the closure made them
    assert found["grad-accumulating"].cause == "missing-zero-grad"
    records = healthy.history.records()
    assert all(not r.grad_none.any() and (r.grad_norm > 0).all() for r in records)


def test_without_a_closure_gradients_and_weights_are_read_before_the_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), 0.1)
    before: list[list[float]] = []
    opt.register_step_pre_hook(lambda o, a, k: before.append(
        [float(torch.linalg.vector_norm(p.detach().double())) for p in model.parameters()]))
    scope = gradscope.watch(model, opt, every=1, live=False)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(model(torch.randn(16, 3)), torch.randn(16, 1)).backward()
        opt.step()
        scope.step()
    scope.close()
    for record, norms in zip(scope.history.records(), before):
        assert record.param_norm.tolist() == pytest.approx(norms, rel=model_norm_rtol(model))


def test_signals_a_set_up_cannot_measure_are_named_in_the_report():
    import io

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), 0.1)
    scope = gradscope.watch(model, opt, live=False)
    for _ in range(25):
        h = model[1](model[0](torch.randn(8, 4)))  # the parts, never the model's forward
        loss = F.cross_entropy(model[2](h), torch.randint(0, 2, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        scope.step(loss)
    scope.close()
    text = scope.report(file=io.StringIO(), width=200)
    lines = [line for line in text.splitlines() if line.startswith("not measured")]
    assert len(lines) == 2, text
    assert "input batches" in lines[0] and "leftover gradients" in lines[1]
    # a model watched whole, with its optimizer, measures everything
    healthy = _classify(CNN(), (4, 1, 8, 8), 25, softmax=False)
    assert "not measured" not in healthy.report(file=io.StringIO(), width=200)


def test_a_loss_written_for_probabilities_with_rows_summing_to_zero_is_not_flagged():
    # a Brier score on a softmax output also sends back gradient rows that sum to zero; the
    # loss's graph shows no softmax into a logit loss, and the graph decides
    def brier(p, y):
        return F.mse_loss(p, F.one_hot(y, 3).float(), reduction="sum") / p.shape[0]

    scope = _classify(CNN(), (4, 1, 8, 8), 40, softmax=True, in_model=True, loss_fn=brier)
    assert all(d.cause != "probabilities-as-logits" for d in scope.diagnose())
    assert {r.activation_before_loss for r in scope.history.records()} == {""}


def test_a_closure_with_several_backward_calls_is_not_taken_for_a_missing_zero_grad():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scope = _lbfgs(zero_inside=True, micro=2)
        plain = _lbfgs(zero_inside=True, micro=2, watch=False)
    assert not [d for d in scope.diagnose() if d.severity in ("warning", "error")]
    # the closure handed to the optimizer only counts its calls: the same training
    for watched, unwatched in zip(scope.model.parameters(), plain.parameters()):
        assert torch.equal(watched, unwatched)
