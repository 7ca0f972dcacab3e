"""The kernels of :mod:`metriclab.metrics.ranking` on numpy arrays, as native code loaded without numba where it can.

numba loads a kernel's cached machine code only after setting itself up, at the first compiled call in a process:
0.3-0.7 s of importing and registering its implementations, about what the whole ranking of a 10k x 60k
evaluation takes. So numba compiles the kernels once (per version of their sources, of numba and llvmlite, and
per CPU) into one object file of C-callable entry points (:func:`build`), kept on disk; a later process loads it
with llvmlite in a few milliseconds, without importing numba, and calls it through ctypes, which releases the
GIL as numba's ``nogil`` kernels do. Where no object can be built or loaded (and on Windows), the same kernels run
through numba's dispatchers, with the same results.

Where the object is kept: ``$METRICLAB_CACHE/kernels`` (``~/.cache/metriclab/kernels``), else ``__pycache__``
beside this file where the first is not writable. ``make setup`` builds it (``python -m metriclab.metrics.kernels``);
otherwise the first call that needs it does (2-10 s). ``METRICLAB_NATIVE_KERNELS=0`` runs numba's dispatchers.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

LANES = 16  # entries of room the vector kernels write past the last they keep (metriclab.metrics.simd.LANES)

# Each kernel's arguments: (dtype, dimensions) of a C-contiguous array, or (int64, 0) for a scalar.
_F4, _F8, _I4, _I8, _B1 = (
    np.dtype(np.float32),
    np.dtype(np.float64),
    np.dtype(np.int32),
    np.dtype(np.int64),
    np.dtype(bool),
)
SIGNATURES: dict[str, tuple[tuple[np.dtype, int], ...]] = {
    "codes": ((_F4, 2), (_I8, 2), (_I8, 2)),
    "nearest": ((_F4, 2), (_F4, 2), (_I8, 1), (_I8, 1), (_I8, 1), (_I8, 2), (_F4, 1), (_I4, 1), (_I8, 1)),
    "ranking_sums": ((_I8, 2), (_I4, 1), (_I8, 1), (_I8, 1), (_I8, 0), (_F8, 1), (_I8, 1)),
    "class_codes": ((_F4, 2), (_F4, 2), (_I8, 1), (_I8, 1), (_I4, 1), (_I4, 1), (_I8, 2), (_I8, 1), (_F4, 1), (_I4, 1)),
    "sorted_sums": (
        (_I8, 2), (_I8, 1), (_I4, 1), (_I4, 1), (_I8, 1), (_I8, 1), (_I8, 0), (_F8, 1), (_B1, 1), (_I8, 1), (_I4, 1),
    ),
}  # fmt: skip
_SOURCES = ("kernels.py", "ranking.py", "simd.py")  # a change to any of them makes a new build

_lock = threading.Lock()
_table: dict[str, Any] | None = None  # the kernels in use, set once (whole) by the first call


# -- what callers use ---------------------------------------------------------------------------------------------


def codes(values: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """int64 codes of ``(values, columns)`` pairs that sort like them: :func:`metriclab.metrics.ranking.codes`."""
    values, columns = np.ascontiguousarray(values, _F4), np.ascontiguousarray(columns, _I8)
    out = np.empty(values.shape, _I8)
    kernel("codes")(values, columns, out)
    return out


def nearest(
    keys: np.ndarray, sample: np.ndarray, rank: np.ndarray, need: np.ndarray, values: np.ndarray, width: int
) -> np.ndarray:
    """``(rows, width)``: ``values`` at each row's ``need[row]`` nearest columns (:func:`.ranking.nearest`)."""
    keys, sample = np.ascontiguousarray(keys, _F4), np.ascontiguousarray(sample, _F4)
    values = np.ascontiguousarray(values, _I8)
    n = keys.shape[1]
    out = np.full((len(keys), width), values[0], _I8)
    scratch = np.empty(n, _F4), np.empty(n, _I4), np.empty(3 * n + 1, _I8)
    kernel("nearest")(keys, sample, _ints(rank), _ints(need), values, out, *scratch)
    return out


def ranking_sums(
    neighbours: np.ndarray, query_ids: np.ndarray, relevant: np.ndarray, top: np.ndarray, vote_k: int
) -> np.ndarray:
    """The metric sums of ranked classes: :func:`metriclab.metrics.ranking.ranking_sums`."""
    relevant, top = _ints(relevant), _ints(top)
    sums = np.zeros(2 * len(top) + 3)
    if len(relevant):
        prefix = _prefix(relevant, top)
        neighbours, query_ids = np.ascontiguousarray(neighbours, _I8), np.ascontiguousarray(query_ids, _I4)
        kernel("ranking_sums")(neighbours, query_ids, relevant, top, int(vote_k), sums, prefix)
    return sums


def class_codes(
    keys: np.ndarray, sample: np.ndarray, rank: np.ndarray, need: np.ndarray, classes: np.ndarray, own: np.ndarray,
    codes: np.ndarray, counts: np.ndarray,
) -> None:  # fmt: skip
    """Each row's candidates as float64 codes with a class flag, :func:`metriclab.metrics.ranking.class_codes`."""
    keys, sample = np.ascontiguousarray(keys, _F4), np.ascontiguousarray(sample, _F4)
    scratch = np.empty(keys.shape[1] + LANES, _F4), np.empty(keys.shape[1] + LANES, _I4)
    kernel("class_codes")(keys, sample, _ints(rank), _ints(need), classes, own, codes, counts, *scratch)


def sorted_sums(
    codes: np.ndarray, counts: np.ndarray, classes: np.ndarray, own: np.ndarray, relevant: np.ndarray,
    top: np.ndarray, vote_k: int, sums: np.ndarray, skipped: np.ndarray,
) -> None:  # fmt: skip
    """Adds the metric sums of sorted code rows to ``sums``: :func:`metriclab.metrics.ranking.sorted_sums`."""
    relevant, top = _ints(relevant), _ints(top)
    if len(relevant):
        prefix = _prefix(relevant, top)
        voters = np.empty(max(int(vote_k), 1), _I4)
        kernel("sorted_sums")(codes, counts, classes, own, relevant, top, int(vote_k), sums, skipped, prefix, voters)


def _ints(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, _I8)


def _prefix(relevant: np.ndarray, top: np.ndarray) -> np.ndarray:
    """The metric sums' scratch: same-class counts among the first ``i`` ranked, for ``i`` up to the most needed."""
    return np.zeros(max(int(relevant.max()), int(top.max())) + 1, _I8)


def kernel(name: str) -> Callable[..., None]:
    """The kernel ``name`` of :data:`SIGNATURES`: native where its object loads, else numba's dispatcher."""
    global _table
    if _table is None:
        with _lock:
            if _table is None:
                _table = _native() or _dispatchers()
    return _table[name]


def native() -> bool:
    """Whether the kernels run as the native object (False: through numba's dispatchers)."""
    kernel("codes")
    return "via numba" not in _table


# -- the object on disk -------------------------------------------------------------------------------------------


def _key() -> str:
    """What the object depends on: these sources, numba's and llvmlite's versions, the CPU numba compiles for and
    numba's settings (``NUMBA_*``)."""
    import llvmlite
    import llvmlite.binding as llvm

    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update((Path(__file__).parent / name).read_bytes())
    digest.update((Path(find_spec("numba").origin).parent / "_version.py").read_bytes())
    settings = sorted((k, v) for k, v in os.environ.items() if k.startswith("NUMBA_") and k != "NUMBA_CACHE_DIR")
    host = (llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten())
    digest.update(repr((llvmlite.__version__, sys.platform, host, settings)).encode())
    return digest.hexdigest()[:24]


def _cache_dirs() -> list[Path]:
    """Where the object may be, in the order searched (the first writable one receives a new build)."""
    root = os.environ.get("METRICLAB_CACHE") or Path.home() / ".cache" / "metriclab"
    return [Path(root).expanduser() / "kernels", Path(__file__).parent / "__pycache__"]


def _stored(key: str) -> tuple[dict[str, Any], bytes] | None:
    """The header and object of the first intact file for ``key`` in the cache folders."""
    for folder in _cache_dirs():
        try:
            header, _, obj = (folder / f"ranking-kernels-{key}.bin").read_bytes().partition(b"\n")
            meta = json.loads(header)
        except (OSError, ValueError):
            continue
        if meta.get("sha256") == hashlib.sha256(obj).hexdigest():  # LLVM crashes on a damaged object
            return meta, obj
    return None


def _native() -> dict[str, Any] | None:
    """The kernels from the object on disk (built first if there is none); None where that fails."""
    if os.environ.get("METRICLAB_NATIVE_KERNELS", "1") == "0" or os.name != "posix":
        return None  # (Windows: the loader looks symbols up in the process the POSIX way; untested there)
    try:
        key = _key()
        stored = _stored(key)
        if stored is None:
            build(key)
            stored = _stored(key)
        return None if stored is None else _load(*stored)
    except Exception as err:  # noqa: BLE001 (numba's dispatchers run the same kernels)
        warnings.warn(f"metriclab: the ranking kernels run through numba's dispatchers: {err}", stacklevel=3)
        return None


def _dispatchers() -> dict[str, Any]:
    from metriclab.metrics import ranking

    return {name: getattr(ranking, name) for name in SIGNATURES} | {"via numba": True}


def _load(meta: dict[str, Any], obj: bytes) -> dict[str, Any] | None:
    """The object's entry points, each a function of numpy arrays (and ints); None where this process lacks
    what the object links to."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    process = ctypes.CDLL(None)  # what the process has linked: Python's C API, the C library

    def found(name: str) -> bool:
        return bool(llvm.address_of_symbol(name)) or hasattr(process, name)

    if not all(found(name) for name in meta["data"]) or any(
        not found(name) and name not in _ERROR_PATHS for name in meta["functions"]
    ):
        return None  # LLVM would abort the process on a missing symbol
    for name in meta["functions"]:
        if not found(name):
            llvm.add_symbol(name, _trap(name))
    target = llvm.Target.from_default_triple().create_target_machine(codemodel="jitdefault")
    engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), target)
    engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
    engine.finalize_object()
    kernels: dict[str, Any] = {"engine": engine}  # the engine owns the code: kept as long as the kernels
    for name, signature in SIGNATURES.items():
        params = [p for _, ndim in signature for p in _c_params(ndim, ctypes.c_void_p, ctypes.c_int64)]
        entry = ctypes.CFUNCTYPE(None, *params)(engine.get_function_address(meta["symbols"][name]))
        kernels[name] = _caller(name, entry, signature)
    return kernels


def _c_params(ndim: int, pointer: Any, int64: Any) -> list[Any]:
    """The C parameters of one argument: an int64 for a scalar, else a pointer and the array's shape."""
    return [int64] if ndim == 0 else [pointer] + [int64] * ndim


# numba runtime functions that compiled code calls only to raise an exception or to free what numba allocated; the
# kernels neither raise (error_model="numpy", and the functions above validate what they pass) nor allocate.
_ERROR_PATHS = frozenset(
    {
        "NRT_Free", "NRT_MemInfo_call_dtor", "numba_do_raise", "numba_gil_ensure", "numba_gil_release",
        "numba_runtime_build_excinfo_struct", "numba_unpickle",
    }
)  # fmt: skip
_traps: list[Any] = []


def _trap(symbol: str) -> int:
    """The address of a native function that stops the process, standing in for numba's ``symbol`` (one of
    :data:`_ERROR_PATHS`): reaching it is a bug in metriclab, which the message says."""

    def stop() -> None:
        message = (
            f"metriclab: a native ranking kernel called {symbol}, which only a failing kernel does: a bug in "
            "metriclab. Set METRICLAB_NATIVE_KERNELS=0 to run the kernels through numba instead, and report it.\n"
        )
        os.write(2, message.encode())  # to the process's stderr, whatever captures sys.stderr
        os.abort()

    _traps.append(ctypes.CFUNCTYPE(None)(stop))
    return ctypes.cast(_traps[-1], ctypes.c_void_p).value


def _caller(name: str, entry: Callable[..., None], signature: tuple[tuple[np.dtype, int], ...]) -> Callable[..., None]:
    """``entry`` (pointers and shapes) called with arrays, each checked against ``signature``."""

    def call(*args: Any) -> None:
        flat: list[int] = []
        for i, (arg, (dtype, ndim)) in enumerate(zip(args, signature, strict=True)):
            if ndim == 0:
                flat.append(int(arg))
                continue
            if arg.dtype != dtype or arg.ndim != ndim or not arg.flags.c_contiguous:
                raise TypeError(f"{name}: argument {i} must be a C-contiguous {ndim}-D {dtype} array")
            flat += [arg.ctypes.data, *arg.shape]
        entry(*flat)

    return call


# -- building it --------------------------------------------------------------------------------------------------


def build(key: str | None = None) -> Path | None:
    """Compiles the kernels with numba into one object file, written to the first writable cache folder; its path
    (None where no folder is writable)."""
    from numba import carray, cfunc, types
    from numba.core.caching import NullCache
    from numba.core.compiler_lock import global_compiler_lock
    from numba.core.dispatcher import Dispatcher
    from numba.core.registry import cpu_target

    from metriclab.metrics import ranking, simd

    assert simd.LANES == LANES
    # numba's disk cache of a kernel is stamped with ranking.py alone, not with simd.py, whose intrinsics the kernels
    # inline: compiled afresh, the object holds the code of the sources its key names.
    dispatchers = [f for f in vars(ranking).values() if isinstance(f, Dispatcher)]
    caches = [d._cache for d in dispatchers]
    for dispatcher in dispatchers:
        dispatcher._cache = NullCache()
    module, symbols = None, {}
    try:
        for name, signature in SIGNATURES.items():
            params = [p for _, ndim in signature for p in _c_params(ndim, types.voidptr, types.int64)]
            entry = _entry(getattr(ranking, name), signature, carray)
            compiled = cfunc(types.void(*params), error_model="numpy")(entry)
            symbols[name] = compiled.native_name
            final = compiled._library._final_module.clone()  # the entry and every kernel it calls, optimised
            if module is None:
                module = final
            else:
                module.link_in(final)
    finally:
        for dispatcher, cache in zip(dispatchers, caches, strict=True):
            dispatcher._cache = cache
    with global_compiler_lock:
        obj = cpu_target.target_context.codegen()._tm.emit_object(module)
    ir = str(module)
    functions = sorted({f for f in re.findall(r'^declare [^@]*@"?([\w.$]+)', ir, re.M) if not f.startswith("llvm.")})
    process = ctypes.CDLL(None)
    runtime = [f for f in functions if not hasattr(process, f) and f not in _ERROR_PATHS]
    if runtime:
        raise RuntimeError(f"the kernels call numba's runtime ({', '.join(runtime)}); without numba they cannot")
    meta = {
        "symbols": symbols,
        "functions": functions,
        "data": sorted(set(re.findall(r'^@"?([\w.$]+)"? = external ', ir, re.M))),
        "sha256": hashlib.sha256(obj).hexdigest(),
    }
    data = json.dumps(meta).encode() + b"\n" + obj
    for folder in _cache_dirs():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return _write(folder / f"ranking-kernels-{key or _key()}.bin", data)
        except OSError:
            continue
    return None


def _entry(kernel: Callable, signature: tuple[tuple[np.dtype, int], ...], carray: Callable) -> Callable:
    """A function of pointers and shapes that calls ``kernel`` on arrays viewing them (for numba's cfunc)."""
    params, args = [], []
    for i, (dtype, ndim) in enumerate(signature):
        shape = [f"a{i}_{d}" for d in range(ndim)]
        params += [f"a{i}", *shape]
        args.append(f"a{i}" if ndim == 0 else f"carray(a{i}, ({', '.join(shape)},), np.{dtype.name})")
    scope = {"kernel": kernel, "carray": carray, "np": np}
    exec(f"def entry({', '.join(params)}):\n    kernel({', '.join(args)})\n", scope)  # noqa: S102 (fixed names)
    return scope["entry"]


def _write(path: Path, data: bytes) -> Path:
    """``data`` written to ``path`` whole (readable by all, as a shared install's ``__pycache__`` needs)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


if __name__ == "__main__":  # python -m metriclab.metrics.kernels: build the object now (make setup does)
    print(f"ranking kernels: {build() or 'no writable cache folder; numba compiles them in each process'}")
