"""Cross-warp memory hazards in the Triton kernels, read from their source (no GPU, no interpreter).

The interpreter runs a program's block operations one after the other, as one thread would, so it never shows
a race between warps. On a GPU the warps of a program drift apart between barriers: a loop that stores through
a pointer and loads through the same pointer at another address, with no ``tl.debug_barrier()`` in the loop,
lets a warp one iteration ahead overwrite what a lagging warp has still to read. ``fast_refine_kernel``'s
backtrack had exactly that (it stored boundary ``t`` and loaded boundary ``t - 1``, the next iteration's
store, to see whether it moved); this test found it and now keeps such loops out.

Loads and stores inside the ``@triton.jit`` helpers a loop calls count too, with the helper's parameters replaced
by the caller's arguments. A load and a store of the same address expression (``prev = tl.load(ptrs);
tl.store(ptrs, prev + v)``, or ``_load(w_ptr, offs)`` then ``_store(w_ptr, offs)``) are one thread's
read-modify-write of its own elements: the same tensor, so the same layout and thread.
"""

import ast
import copy
from pathlib import Path

KERNELS = Path(__file__).resolve().parent.parent / "kernels"


def _jit(fn: ast.AST) -> bool:
    return isinstance(fn, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in fn.decorator_list)


def _root(node: ast.expr) -> str | None:
    """The pointer an address expression starts from (``ptr + a + b`` -> ``ptr``)."""
    while True:
        if isinstance(node, ast.BinOp):
            node = node.left
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("multiple_of", "max_contiguous"):
            node = node.args[0]
        else:
            return node.id if isinstance(node, ast.Name) else None


class _Bind(ast.NodeTransformer):
    def __init__(self, bind: dict[str, ast.expr]):
        self.bind = bind

    def visit_Name(self, node: ast.Name) -> ast.expr:
        return self.bind.get(node.id, node)


def _accesses(body: list[ast.stmt], helpers: dict[str, ast.FunctionDef], depth: int = 0) -> list[tuple[str, ast.expr]]:
    """``(load | store, address)`` of every access in ``body``, through the jit helpers it calls."""
    out = []
    for node in ast.walk(ast.Module(body=body, type_ignores=[])):
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Attribute) and node.func.attr in ("load", "store") and node.args:
            out.append((node.func.attr, node.args[0]))
        elif isinstance(node.func, ast.Name) and node.func.id in helpers and depth < 8:
            fn = helpers[node.func.id]
            bind = dict(zip((a.arg for a in fn.args.args), node.args)) | {k.arg: k.value for k in node.keywords}
            out += [(kind, _Bind(bind).visit(copy.deepcopy(a))) for kind, a in _accesses(fn.body, helpers, depth + 1)]
    return out


def hazards(sources: dict[str, str]) -> list[str]:
    """``file:line kernel pointer`` of each loop in a ``@triton.jit`` function of ``sources`` (name -> source) that
    stores through a pointer and loads through it at another address with no barrier in the loop."""
    trees = {name: ast.parse(src) for name, src in sources.items()}
    found = []
    for name, tree in trees.items():
        helpers = {fn.name: fn for t in trees.values() for fn in t.body if _jit(fn)}
        helpers |= {fn.name: fn for fn in tree.body if _jit(fn)}  # (a name in two files: this file's)
        for fn in (n for n in ast.walk(tree) if _jit(n)):
            for loop in (n for n in ast.walk(fn) if isinstance(n, (ast.For, ast.While))):
                if any(getattr(n, "attr", None) == "debug_barrier" for n in ast.walk(loop)):
                    continue
                acc = [(kind, _root(a), ast.unparse(a)) for kind, a in _accesses(loop.body, helpers)]
                stores: dict[str | None, set[str]] = {}
                for kind, ptr, addr in acc:
                    if kind == "store":
                        stores.setdefault(ptr, set()).add(addr)
                found += [
                    f"{name}:{loop.lineno} {fn.name} {ptr}"
                    for kind, ptr, addr in acc
                    if kind == "load" and ptr is not None and ptr in stores and stores[ptr] != {addr}
                ]
    return sorted(set(found))


def test_no_kernel_loop_reads_what_another_warp_may_have_rewritten():
    sources = {f.name: f.read_text() for f in sorted(KERNELS.glob("*.py"))}
    assert len(sources) >= 10 and any("fast_refine_kernel" in s for s in sources.values())
    assert hazards(sources) == []


def test_the_check_finds_the_old_backtrack():
    """The pattern fixed in ``fast_refine_kernel`` (2026-12-01), directly and through a helper, and the
    read-modify-writes it must not flag."""
    old = """
@triton.jit
def _prev(ptr, t):
    return tl.load(ptr + tl.maximum(t - 1, 1))


@triton.jit
def _get(ptr, offs):
    return tl.load(ptr + offs)


@triton.jit
def _put(ptr, offs, x):
    tl.store(ptr + offs, x)


@triton.jit
def k(bnd_ptr, out_ptr, w_ptr, T):
    old = tl.load(bnd_ptr + T - 1)
    for ib in range(0, T - 1):
        tb = T - 1 - ib
        nold = tl.load(bnd_ptr + tl.maximum(tb - 1, 1))
        tl.store(bnd_ptr + tb, old + 1)
        old = nold
    for j in range(0, T):
        ptrs = out_ptr + j
        tl.store(ptrs, tl.load(ptrs) + 1.0)
        _put(w_ptr, j, _get(w_ptr, j) * 2.0)
"""
    assert hazards({"k.py": old}) == ["k.py:20 k bnd_ptr"]
    with_barrier = old.replace("        old = nold", "        old = nold\n        tl.debug_barrier()")
    assert hazards({"k.py": with_barrier}) == []
    through_helper = old.replace("tl.load(bnd_ptr + tl.maximum(tb - 1, 1))", "_prev(bnd_ptr, tb)")
    assert hazards({"k.py": through_helper}) == ["k.py:20 k bnd_ptr"]
    other_offset = old.replace("_put(w_ptr, j, _get(w_ptr, j) * 2.0)", "_put(w_ptr, j + 1, _get(w_ptr, j) * 2.0)")
    assert hazards({"k.py": other_offset}) == ["k.py:20 k bnd_ptr", "k.py:25 k w_ptr"]
