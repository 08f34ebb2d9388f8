"""Record Triton launches in the CPU interpreter and compile them ahead of time for a GPU, without one.

Shared by ``tests/test_gpu_compile.py`` (does every specialization compile for sm_90?) and
``bench/static.py`` (the static performance gate). Three steps:

1. :func:`record_launches` patches Triton's interpreter so that every launch the launchers make
   on small CPU tensors is recorded as a JSON *spec*: kernel module and name, each argument's
   kind (tensor dtype and 16-byte alignment, int value, float, bool, None) and the launch options.
2. :func:`compile_specs` compiles specs in a fresh process (``python -m bench.aot``), optionally
   under another Triton (``triton_path`` goes first on ``PYTHONPATH``), for
   ``GPUTarget("cuda", arch, 32)``. The worker rebuilds each launch's specialization with the
   JIT function's own binder (so 16-byte divisibility and ``== 1`` specialization match a real
   launch), compiles with Triton's bundled ptxas, and reads the figures back from the cubin with
   the bundled ``cuobjdump``: registers, local (spill) bytes, shared memory, and SASS instruction
   counts (128-bit global loads, HGMMA / HMMA, spill loads and stores, shared atomics, ...).
3. Figures are cached as JSON under ``cache_dir`` keyed by the kernel's source hash (Triton's
   ``JITFunction.cache_key``, which covers the functions it calls), the spec, the Triton version
   and the arch; Triton's own cache lives beside them, so deleting ``cache_dir`` makes a cold run.

Example:
    >>> with record_launches() as specs:
    ...     my_launcher(torch.randn(100))  # on CPU, under TRITON_INTERPRET=1
    >>> results = compile_specs(specs, arch=90)  # [{"ok": True, "regs": 40, "spill_bytes": 0, ...}]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = [
    "OPTION_KEYS",
    "cache_root",
    "compile_kernel",
    "compile_specs",
    "describe",
    "record_launches",
    "side_paths",
    "site_version",
    "spec_id",
    "unique_specs",
]

ROOT = Path(__file__).resolve().parents[1]
OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_DTYPES = {
    "float32": "fp32",
    "float16": "fp16",
    "bfloat16": "bf16",
    "float64": "fp64",
    "int64": "i64",
    "int32": "i32",
    "int16": "i16",
    "int8": "i8",
    "uint8": "u8",
    "bool": "i1",
}


def user_cache() -> Path:
    """``~/.cache/atmc_triton``: the static figures' default cache and the side Triton installs."""
    return Path.home() / ".cache" / "atmc_triton"


def cache_root() -> Path:
    """``$ATMC_STATIC_CACHE`` or ``~/.cache/atmc_triton/static`` (figures and Triton's own cache)."""
    env = os.environ.get("ATMC_STATIC_CACHE")
    return Path(env) if env else user_cache() / "static"


_SIDE_ENV = "ATMC_TRITON"


def side_dir(version: str) -> Path:
    """Where a side install of Triton ``version`` is cached (``bench.static.triton_site``): per Python minor
    version, since the package's compiled extension is built for one (a 3.11 install fails to import under 3.12)."""
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return user_cache() / f"triton-{version}-{py}"


def side_env(version: str) -> str:
    """The variable naming an existing install of Triton ``version``: ``ATMC_TRITON36`` for 3.6.x."""
    return _SIDE_ENV + "".join(version.split(".")[:2])


def describe(v) -> list:
    """JSON description of one kernel argument (what the specialization depends on)."""
    import torch

    if isinstance(v, torch.Tensor):
        return ["tensor", _DTYPES[str(v.dtype).removeprefix("torch.")], v.data_ptr() % 16 == 0]
    if isinstance(v, bool):
        return ["bool", v]
    if isinstance(v, int):
        return ["int", v]
    if isinstance(v, float):
        return ["float", v]
    if v is None:
        return ["none", None]
    raise TypeError(f"unexpected kernel argument {v!r}")


@contextlib.contextmanager
def record_launches(execute: bool = True):
    """Record every interpreted Triton launch as a spec dict (yields the list they are appended to).

    ``execute=False`` records without running the kernels (outputs stay unwritten): launchers can then
    be driven at realistic sizes and with bf16 tensors, which the interpreter cannot run.
    """
    from triton.runtime.interpreter import InterpretedFunction

    specs: list[dict] = []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in OPTION_KEYS if k in kwargs}
        bound = {**dict(zip(self.arg_names, args)), **kwargs}
        specs.append(
            {
                "module": self.fn.__module__,
                "name": self.fn.__name__,
                "args": {k: describe(v) for k, v in bound.items()},
                "options": {"num_warps": 4, "num_stages": 3, **options},
            }
        )
        if execute:
            return original(self, *args, grid=grid, warmup=warmup, **options, **kwargs)
        return None

    InterpretedFunction.run = run
    try:
        yield specs
    finally:
        InterpretedFunction.run = original


def spec_id(spec: dict) -> str:
    return json.dumps({k: spec[k] for k in ("module", "name", "args", "options")}, sort_keys=True)


def unique_specs(specs: list[dict]) -> list[dict]:
    """Specs without repeats (same kernel, arguments and options), first occurrence kept."""
    return list({spec_id(s): s for s in specs}.values())


def compile_specs(
    specs: list[dict],
    arch: int = 90,
    triton_path: str | None = None,
    cache_dir: Path | None = None,
    jobs: int | None = None,
    analyze: bool = True,
    timeout: float = 1800,
) -> list[dict]:
    """Compile ``specs`` for ``sm_<arch>`` (a spec's own ``"arch"`` wins) in one subprocess; one result per spec.

    Each result has ``ok`` and, on failure, ``error``; with ``analyze`` also ``regs``,
    ``spill_bytes``, ``smem``, ``num_warps``, ``sass`` (instruction counts), ``triton`` (version),
    ``compile_s`` / ``compile_cpu_s`` (wall and CPU seconds of the cold compile, also when cached)
    and ``cached``. ``triton_path``: a directory holding another ``triton`` package (put first
    on ``PYTHONPATH``). Raises ``RuntimeError`` if the worker itself fails.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([p for p in (triton_path, str(ROOT), env.get("PYTHONPATH")) if p])
    env["TRITON_CACHE_DIR"] = str(cache_dir / "triton-cache")  # Triton's own cache (keyed by its version)
    with tempfile.TemporaryDirectory() as d:
        inp, out = Path(d) / "specs.json", Path(d) / "results.json"
        job = {
            "specs": specs,
            "arch": arch,
            "cache": str(cache_dir),
            "analyze": analyze,
            "jobs": jobs,
            "tools": _tools(),
        }
        inp.write_text(json.dumps(job))
        res = subprocess.run(
            [sys.executable, "-m", "bench.aot", str(inp), str(out)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if res.returncode != 0 or not out.exists():
            raise RuntimeError(f"AOT compile worker failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
        return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------- the worker
# Everything below runs in the subprocess, with the Triton under test and without TRITON_INTERPRET.

_SASS_COUNTS = {  # name -> regex over SASS opcodes (the instruction text after the address)
    "ldg": r"\bLDG\b",
    "ldg128": r"\bLDG(\.\w+)*\.(128|256)\b",
    "stg": r"\bSTG\b",
    "stg128": r"\bSTG(\.\w+)*\.(128|256)\b",
    "hgmma": r"\bHGMMA\b",
    "hmma": r"\bHMMA\b",
    "ffma": r"\bFFMA\b",
    "stl": r"\bSTL\b",
    "ldl": r"\bLDL\b",
    "atoms": r"\bATOMS\b",
    "atomg": r"\b(ATOMG|RED)\b",
    "popc": r"\bPOPC\b",
    "vote": r"\bVOTE\b",
    "bar": r"\bBAR\b",
}


def _tools() -> str | None:
    """The installed Triton's bundled CUDA tools (its cuobjdump also reads cubins of older Tritons for newer arches)."""
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.origin:
        return None
    return str(Path(spec.origin).parent / "backends" / "nvidia" / "bin")


def site_version(site: Path) -> str | None:
    """The Triton version a ``pip install --target`` directory (or a site-packages) holds, or ``None``."""
    meta = list(site.glob("triton-*.dist-info"))
    return (
        meta[0].name.removeprefix("triton-").removesuffix(".dist-info") if meta and (site / "triton").is_dir() else None
    )


def side_paths(arg: str) -> list[str]:
    """The ``--side DIR[,DIR...]|off`` option of the SASS-count tools: the side Triton directories it names."""
    return [] if arg == "off" else arg.split(",")


def _newest_tools() -> str | None:
    """The CUDA tools of the newest Triton at hand: the installed one or a side install (``$ATMC_TRITON<mm>``,
    ``~/.cache/atmc_triton/triton-*``). For a cubin the installed tools cannot decode: Triton 3.6's cuobjdump
    does not know sm_121a, so with 3.6 installed (torch 2.11) its sm_121 cubins are read with a side 3.9's."""
    import importlib.util

    def version(site: Path) -> tuple[int, ...]:
        found = site_version(site)
        if found is None or not (site / "triton" / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
            return ()
        return tuple(int(p) for p in re.findall(r"\d+", found)[:3])

    sites = [Path(v) for k, v in os.environ.items() if re.fullmatch(_SIDE_ENV + r"\d+", k)]
    sites += sorted(user_cache().glob("triton-*"))  # every version's side_dir, for any Python
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        sites.insert(0, Path(spec.origin).parent.parent)
    best = max(sites, key=version, default=None)
    return str(best / "triton" / "backends" / "nvidia" / "bin") if best is not None and version(best) else None


def _sass_figures(cubin: bytes, tools: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = sass = None
        for find in (lambda: tools, _newest_tools):  # (the newest tools looked up only when these fail)
            attempt = find()
            if attempt is None:
                continue
            cuobjdump = str(Path(attempt) / "cuobjdump")
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
            sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True)
            if not (usage.returncode or sass.returncode) or "Cannot decode architecture" not in sass.stderr:
                break  # (an architecture these tools do not know: the newest at hand may)
    if usage is None or sass is None:
        raise RuntimeError("cuobjdump not found: no Triton with its bundled CUDA tools")
    if usage.returncode or sass.returncode:
        raise RuntimeError(f"cuobjdump failed: {usage.stderr[-500:]} {sass.stderr[-500:]}")
    fig = {k: int(re.search(rf"\b{k}:(\d+)", usage.stdout).group(1)) for k in ("REG", "STACK", "SHARED", "LOCAL")}
    ops = [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", sass.stdout)]
    counts = {k: sum(1 for op in ops if re.search(rx, op)) for k, rx in _SASS_COUNTS.items()}
    counts["total"] = len(ops)
    counts["loop"] = _longest_loop(sass.stdout)
    return {"usage": fig, "sass": counts}


def _longest_loop(sass: str) -> int:
    """Instructions in the longest backward-branch body of the SASS (a kernel's hot loop, issued once per
    warp and iteration); 0 without loops."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    best = 0
    for addr, op in ins:
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", op)
        if m and int(m.group(1), 16) < addr:
            best = max(best, sum(1 for a, _ in ins if int(m.group(1), 16) <= a <= addr))
    return best


def _arg_value(desc: list):
    """A stand-in argument with the recorded properties (the binder only reads dtype and data_ptr)."""
    kind, value = desc[0], desc[1]
    if kind == "tensor":
        import triton.language as tl

        class _Arg:  # what Triton's specialization reads of a tensor
            dtype = {
                "fp32": tl.float32,
                "fp16": tl.float16,
                "bf16": tl.bfloat16,
                "fp64": tl.float64,
                "i64": tl.int64,
                "i32": tl.int32,
                "i16": tl.int16,
                "i8": tl.int8,
                "u8": tl.uint8,
                "i1": tl.int1,
            }[value]

            @staticmethod
            def data_ptr():
                return 0 if desc[2] else 8

        return _Arg()
    return value


def _spec_key(fn, spec: dict, arch: int) -> str:
    import triton

    h = hashlib.sha256()
    h.update(f"{fn.cache_key}|{triton.__version__}|sm_{arch}|{spec_id(spec)}".encode())
    return h.hexdigest()[:32]


def _jit_function(spec: dict):
    import importlib

    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(spec["module"]), spec["name"])
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def _cpu_s(resource) -> float:
    """CPU seconds of this process and its finished children (ptxas): a compile's cost on an idle core."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def compile_kernel(spec: dict, arch: int):
    """The ``CompiledKernel`` of one recorded spec for ``sm_<arch>`` with the Triton on ``sys.path``
    (no GPU needed; ``kernel.asm["cubin"]`` holds the SASS)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _jit_function(spec)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {k: _arg_value(v) for k, v in spec["args"].items()}
    opts = {**spec["options"], "debug": False}
    bound, specialization, options = binder(**kwargs, **opts)
    options, signature, constexprs, attrs = fn._pack_args(backend, opts, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _compile_one(job: tuple[dict, int, str, bool, str]) -> dict:
    spec, arch, cache, analyze, tools = job
    arch = spec.get("arch", arch)
    import resource
    import time

    import triton

    try:
        fn = _jit_function(spec)
        key = _spec_key(fn, {**spec, "arch": arch}, arch)
        path = Path(cache) / "figures" / f"{key}.json"
        if path.exists():
            cached = json.loads(path.read_text())
            # (figures written before compile times or loop lengths were kept are redone)
            if "compile_cpu_s" in cached and (not analyze or "loop" in cached.get("sass", {})):
                return {**cached, "cached": True}
        t0, c0 = time.perf_counter(), _cpu_s(resource)
        kernel = compile_kernel(spec, arch)
        res = {"ok": True, "triton": triton.__version__, "arch": arch}
        res |= {"compile_s": time.perf_counter() - t0, "compile_cpu_s": _cpu_s(resource) - c0}
        if analyze:
            fig = _sass_figures(kernel.asm["cubin"], tools or str(Path(triton.__file__).parent / "backends/nvidia/bin"))
            res |= {
                "regs": fig["usage"]["REG"],
                "spill_bytes": fig["usage"]["LOCAL"],
                "stack_bytes": fig["usage"]["STACK"],
                "smem": int(kernel.metadata.shared) + fig["usage"]["SHARED"],
                "num_warps": int(kernel.metadata.num_warps),
                "num_stages": int(kernel.metadata.num_stages),
                "sass": fig["sass"],
            }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(res))
        tmp.replace(path)
        return {**res, "cached": False}
    except Exception as e:  # report every failing specialization, not just the first
        consts = {k: v[1] for k, v in spec["args"].items() if v[0] != "tensor"}
        return {"ok": False, "error": f"{spec['name']} {consts} {spec['options']}: {type(e).__name__}: {str(e)[:600]}"}


def _worker(inp: str, out: str) -> None:
    import multiprocessing

    import triton

    job = json.loads(Path(inp).read_text())
    cache = str(Path(job["cache"]) / f"triton-{triton.__version__}")
    jobs = [(s, job["arch"], cache, job["analyze"], job["tools"]) for s in job["specs"]]
    procs = job.get("jobs") or max(1, os.cpu_count() or 1)
    if procs == 1 or len(jobs) <= 1:
        results = [_compile_one(j) for j in jobs]
    else:
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            results = pool.map(_compile_one, jobs, chunksize=1)
    Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
