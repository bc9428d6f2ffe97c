"""The examples in gradscope's docstrings run and print what they show."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import gradscope

#: modules that need an optional package, and that package
OPTIONAL = {
    "gradscope.integrations.lightning": "lightning",
    "gradscope.integrations.tensorboard": "tensorboard",
    "gradscope.integrations.transformers": "transformers",
}

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(gradscope.__path__, prefix="gradscope.")
    if not info.name.endswith("__main__")  # importing it runs the CLI
)


def _examples(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = [t for t in finder.find(module, name) if t.examples]
    for test in tests:  # find() shares one dict among them, and a run clears it: one each
        test.globs = dict(vars(module))
    return tests


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name], reason=f"{name} needs {OPTIONAL[name]}")
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in _examples(name):
        result = runner.run(test, out=lambda text: None)
        assert result.failed == 0, _failure_text(test, runner)


def _failure_text(test: doctest.DocTest, runner: doctest.DocTestRunner) -> str:
    rerun = doctest.DocTestRunner(optionflags=runner.optionflags)
    lines: list[str] = []
    rerun.run(test, out=lines.append)
    return f"{test.name}:\n" + "".join(lines)


def test_every_public_function_has_an_example():
    missing = [name for name in gradscope.__all__
               if inspect.isfunction(getattr(gradscope, name))
               and ">>>" not in (getattr(gradscope, name).__doc__ or "")]
    assert not missing, f"public names without a docstring example: {missing}"
