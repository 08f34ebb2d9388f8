"""Cross-warp memory hazards in the Triton kernels, read from their source (no GPU, no interpreter).

The interpreter runs a program's block operations one after the other, as one thread would, so it never shows
a race between warps. On a GPU the warps of a program drift apart between barriers: a loop that stores through
a pointer and loads through the same pointer at another address, with no ``tl.debug_barrier()`` in the loop,
lets a warp one iteration ahead overwrite what a lagging warp has still to read. ``fast_refine_kernel``'s
backtrack had exactly that (it stored boundary ``t`` and loaded boundary ``t - 1``, the next iteration's
store, to see whether it moved); this test found it and now keeps such loops out.

A load and a store of the same address expression (``prev = tl.load(ptrs); tl.store(ptrs, prev + v)``) are
one thread's read-modify-write of its own elements: the same tensor, so the same layout and thread.
"""

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parent.parent / "kernels"


def _root(node: ast.expr) -> str | None:
    """The pointer an address expression starts from (``ptr + a + b`` -> ``ptr``)."""
    while True:
        if isinstance(node, ast.BinOp):
            node = node.left
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("multiple_of", "max_contiguous"):
            node = node.args[0]
        else:
            return node.id if isinstance(node, ast.Name) else None


def _calls(body: list[ast.stmt], attr: str):
    for node in ast.walk(ast.Module(body=body, type_ignores=[])):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr:
            yield node


def hazards(source: str, name: str = "<kernel>") -> list[str]:
    """``file:line kernel pointer`` of each loop in a ``@triton.jit`` function that stores through a pointer
    and loads through it at another address with no barrier in the loop."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, ast.FunctionDef) or not any("jit" in ast.unparse(d) for d in fn.decorator_list):
            continue
        for loop in (n for n in ast.walk(fn) if isinstance(n, (ast.For, ast.While))):
            if any(True for _ in _calls(loop.body, "debug_barrier")):
                continue
            stores: dict[str, set[str]] = {}
            for call in _calls(loop.body, "store"):
                stores.setdefault(_root(call.args[0]), set()).add(ast.unparse(call.args[0]))
            for call in _calls(loop.body, "load"):
                ptr, addr = _root(call.args[0]), ast.unparse(call.args[0])
                if ptr is not None and ptr in stores and stores[ptr] != {addr}:
                    found.append(f"{name}:{loop.lineno} {fn.name} {ptr}")
    return found


def test_no_kernel_loop_reads_what_another_warp_may_have_rewritten():
    files = sorted(KERNELS.glob("*.py"))
    assert len(files) >= 10 and any("fast_refine_kernel" in f.read_text() for f in files)
    found = [h for f in files for h in hazards(f.read_text(), f.name)]
    assert not found, found


def test_the_check_finds_the_old_backtrack():
    """The pattern fixed in ``fast_refine_kernel`` (2026-12-01), and the read-modify-write it must not flag."""
    old = """
@triton.jit
def k(bnd_ptr, out_ptr, T):
    old = tl.load(bnd_ptr + T - 1)
    for ib in range(0, T - 1):
        tb = T - 1 - ib
        nold = tl.load(bnd_ptr + tl.maximum(tb - 1, 1))
        tl.store(bnd_ptr + tb, old + 1)
        old = nold
    for j in range(0, T):
        ptrs = out_ptr + j
        tl.store(ptrs, tl.load(ptrs) + 1.0)
"""
    assert hazards(old) == ["<kernel>:5 k bnd_ptr"]
    assert hazards(old.replace("        old = nold", "        old = nold\n        tl.debug_barrier()")) == []
