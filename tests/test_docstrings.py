"""The ``>>>`` examples of the public API's docstrings run as written (docs that match the code).

The public API is every name of ``atmc_triton.__all__`` (with the methods of its classes and, for its
submodules, their own functions and classes) and every name of ``atmc_triton.kernels.__all__``. Each
example runs in its module's namespace, as ``python -m doctest`` would, with ``ELLIPSIS`` and
``NORMALIZE_WHITESPACE`` and torch seeded."""

import doctest
import inspect
import warnings

import pytest
import torch

import atmc_triton as at

K = at.kernels
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# the most-used entry points: each must keep a runnable example
MUST_HAVE_EXAMPLE = ("atmc_triton", "compress_", "ADMM", "finalize_", "pack_", "load_packed", "attacks", "pgd")


def _public() -> list[tuple[str, object]]:
    objs = [("atmc_triton", at)] + [(n, getattr(at, n)) for n in at.__all__]
    return objs + [(f"kernels.{n}", getattr(K, n)) for n in K.__all__]


def _collect() -> tuple[dict[str, doctest.DocTest], set[str]]:
    """The doctests to run, by name, and the public names whose own docstring has an example."""
    finder, tests, seen, with_example = doctest.DocTestFinder(), {}, set(), set()
    for name, obj in _public():
        if not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # constants (PROTOCOLS, HAS_TRITON, ...) carry no docstring of their own
        mod = obj if inspect.ismodule(obj) else inspect.getmodule(obj)
        for t in finder.find(obj, name, module=mod, globs=vars(mod)):
            if t.examples and t.name == name:
                with_example.add(name)
            if t.examples and t.docstring not in seen:  # at.pgd is attacks.pgd: run it once
                seen.add(t.docstring)  # (not by line: a decorated function's line is its wrapper's)
                tests[t.name] = t
    return tests, with_example


TESTS, WITH_EXAMPLE = _collect()


def test_the_public_api_has_examples():
    assert len(TESTS) >= 40, sorted(TESTS)  # a finder that finds nothing would pass every test below
    missing = [n for n in MUST_HAVE_EXAMPLE if n not in WITH_EXAMPLE]
    assert not missing, f"no >>> example in the docstring of {missing}"


@pytest.mark.parametrize("name", sorted(TESTS))
def test_docstring_example_runs(name):
    test = TESTS[name]
    out: list[str] = []
    torch.manual_seed(0)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: two threads on a busy 2-core machine spin (35 s against 6 s here)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tiny budgets in the examples warn (CollapseWarning); not the point
            result = runner.run(test, out=out.append, clear_globs=True)
    finally:
        torch.set_num_threads(threads)
    assert result.failed == 0, "".join(out)


def _package_modules() -> list[str]:
    import pkgutil

    return [f"atmc_triton.{m.name}" for m in pkgutil.iter_modules(at.__path__) if m.name != "__main__"]


@pytest.mark.parametrize("name", _package_modules())
def test_every_module_runs_its_examples(name):
    """Every ``>>>`` of every module of the package, module docstrings and private helpers included (the public
    API's collection above missed ``bitalloc``'s module example, which printed a Generator it did not show)."""
    import importlib

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = doctest.testmod(importlib.import_module(name), optionflags=FLAGS, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed (python -m doctest)"
