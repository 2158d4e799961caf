"""One C++ library per compiled graph instead of one per kernel, for torch.compile on CPUs.

Inductor's CPU backend builds every fused kernel as its own shared library. On the 2-core Zen 4
machine of benchmarks/RESULTS.md each such g++ run takes about 0.9 s, nearly all of it the same
for every kernel (the C++ front end's work on inductor's headers and their templates), and the
first step of the embedded default run built 106 of them: ~108 s of compiler time. Built as one
file, 100 of those kernels take 8.7 s: each kernel adds about 0.08 s.

`batched_kernel_builds()` makes inductor gather the kernels of each module it generates (one per
compiled graph) and build them as one library with a Python binding per kernel. Each kernel's C++
is inductor's own, renamed; the flags are inductor's (the cache's C++ loader picks them), so the
machine code and the results are the same, bit for bit (tests/test_kernel_batching.py). Inductor's
on-disk cache keys the library by its whole source, so a later run loads it without a compile.

Inductor does not offer this; it is done by replacing `AsyncCompile.cpp_pybinding`, a private
API, while the context is open. Kernels it does not recognise (another entry point, an argument
that is not a pointer) go through inductor's own path, as do the kernels of a library that fails to
build or load; the trainer's compile probe runs with the batching on, and turns it off for the
run when anything about it fails there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

# How inductor's CPU kernels open their entry function (torch 2.14).
ENTRY = 'extern "C"  void  kernel('


def batchable(argtypes: Sequence[str], source: str) -> bool:
    """Whether a kernel fits the batched library: one entry function as inductor writes it, and
    only pointer arguments (static shapes pass no sizes)."""
    return source.count(ENTRY) == 1 and all(t.strip().endswith("*") for t in argtypes)


def binding(index: int, argtypes: Sequence[str]) -> str:
    """The Python binding of kernel `index`: checks the argument count, passes each tensor's data
    pointer, and turns a C++ exception (a kernel's bounds check) into a RuntimeError."""
    args = ", ".join(f"lanit_data<{t.replace('const ', '').strip()}>(args, {n})"
                     for n, t in enumerate(argtypes))
    return f"""
static PyObject* lanit_call_{index}(PyObject*, PyObject* args) {{
    if (!lanit_arity(args, {len(argtypes)})) return nullptr;
    try {{
        lanit_kernel_{index}({args});
    }} catch (const std::exception& err) {{
        PyErr_SetString(PyExc_RuntimeError, err.what());
        return nullptr;
    }}
    Py_RETURN_NONE;
}}"""


def library_source(kernels: Sequence[tuple[Sequence[str], str]], module: str) -> str:
    """One C++ file with every kernel (`(argtypes, source)`, entries renamed `lanit_kernel_<i>`)
    and a Python extension module `module` whose function `kernel_<i>` runs kernel i."""
    parts = [source.replace(ENTRY, f'extern "C" void lanit_kernel_{i}(', 1)
             for i, (_, source) in enumerate(kernels)]
    parts.append("""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <cstdint>
#include <cstdlib>
#include <exception>

// Tensor -> data pointer: a function of torch's whose address inductor's loader puts in this
// variable before it imports a library.
static void* (*lanit_data_ptr)(PyObject*) = nullptr;

template <typename T> static inline T lanit_data(PyObject* args, Py_ssize_t n) {
    return static_cast<T>(lanit_data_ptr(PyTuple_GET_ITEM(args, n)));
}

static bool lanit_arity(PyObject* args, Py_ssize_t expected) {
    if (PyTuple_CheckExact(args) && PyTuple_GET_SIZE(args) == expected) return true;
    PyErr_Format(PyExc_TypeError, "the kernel takes %zd tensors", expected);
    return false;
}""")
    parts.extend(binding(i, argtypes) for i, (argtypes, _) in enumerate(kernels))
    methods = "".join(f'\n    {{"kernel_{i}", lanit_call_{i}, METH_VARARGS, nullptr}},'
                      for i in range(len(kernels)))
    parts.append(f"""
static PyMethodDef lanit_methods[] = {{{methods}
    {{nullptr, nullptr, 0, nullptr}}}};

static PyModuleDef lanit_module = {{PyModuleDef_HEAD_INIT, "{module}", nullptr, -1, lanit_methods}};

PyMODINIT_FUNC PyInit_{module}(void) {{
    const char* address = std::getenv("_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR");
    if (address == nullptr || std::strtoull(address, nullptr, 10) == 0) {{
        PyErr_SetString(PyExc_ImportError, "inductor did not pass its tensor data accessor");
        return nullptr;
    }}
    lanit_data_ptr = reinterpret_cast<void* (*)(PyObject*)>(
        static_cast<std::uintptr_t>(std::strtoull(address, nullptr, 10)));
    return PyModule_Create(&lanit_module);
}}
""")
    return "\n".join(parts)


@dataclass
class Batching:
    """What `batched_kernel_builds` yields: whether it is on (this torch has what it needs), and
    how many libraries failed to build or load, their kernels built by inductor instead."""

    active: bool
    failures: int = 0

    @property
    def worked(self) -> bool:
        return self.active and self.failures == 0


class _Library:
    """The kernels one generated module asks for, built together when the module's closing `wait`
    (or a first call) needs them, by then all of them. Where the library does not build or load,
    each kernel is built on its own by `build_one` (inductor's own path), so a run goes on."""

    def __init__(self, build_one: Callable[[list[str], str], Any], state: Batching) -> None:
        self.kernels: list[tuple[list[str], str]] = []
        self._build_one = build_one
        self._state = state
        self._load: Callable[[], Any] | None = None
        self._failed = False

    @property
    def started(self) -> bool:
        return self._load is not None or self._failed

    def add(self, argtypes: Sequence[str], source: str) -> _Pending:
        self.kernels.append((list(argtypes), source))
        return _Pending(self, len(self.kernels) - 1)

    def kernel(self, index: int) -> Any:
        from torch._inductor.codecache import CppPythonBindingsCodeCache as Loader

        if not self._failed:
            try:
                if self._load is None:
                    # The loader imports the library as "<key>.<entry_function>", so that is the
                    # name its init function must carry. Built in this process: the module waits
                    # for it anyway.
                    source = library_source(self.kernels, Loader.entry_function)
                    self._load = Loader.load_async(source, "cpu")
                return getattr(self._load(), f"kernel_{index}")
            except Exception:  # noqa: BLE001 - whatever failed, inductor's own builds remain
                self._failed = True
                self._state.failures += 1
        built = self._build_one(*self.kernels[index])
        return built.result() if hasattr(built, "result") else built  # a future, or the kernel


class _Pending:
    """Kernel `index` of a library not yet built: what the generated module holds until its
    closing `wait` swaps in the kernel. Callable too, in case a module ever skips the wait."""

    def __init__(self, library: _Library, index: int) -> None:
        self.library, self.index = library, index

    def result(self) -> Any:
        return self.library.kernel(self.index)

    def __call__(self, *args: Any) -> None:
        return self.result()(*args)


@contextlib.contextmanager
def batched_kernel_builds() -> Iterator[Batching]:
    """While open, inductor builds the CPU kernels of each generated module as one library (see
    the module docstring). Where this torch lacks the parts it needs, it changes nothing and
    yields an inactive `Batching`."""
    try:
        from torch._inductor.async_compile import AsyncCompile
        from torch._inductor.codecache import CppPythonBindingsCodeCache
    except ImportError:
        yield Batching(active=False)
        return
    original_binding = AsyncCompile.__dict__.get("cpp_pybinding")
    original_wait = AsyncCompile.__dict__.get("wait")
    if original_binding is None or original_wait is None or \
            not hasattr(CppPythonBindingsCodeCache, "load_async"):
        yield Batching(active=False)
        return
    state = Batching(active=True)

    def cpp_pybinding(self, argtypes, source_code):
        if not batchable(argtypes, source_code):
            return original_binding(self, argtypes, source_code)
        library = self.__dict__.get("_lanit_library")
        if library is None or library.started:
            library = _Library(lambda argtypes, source: original_binding(self, argtypes, source), state)
            self.__dict__["_lanit_library"] = library
        return library.add(argtypes, source_code)

    def wait(self, scope):
        for name, value in list(scope.items()):
            if isinstance(value, _Pending):
                scope[name] = value.result()
        return original_wait(self, scope)

    AsyncCompile.cpp_pybinding, AsyncCompile.wait = cpp_pybinding, wait
    try:
        yield state
    finally:
        AsyncCompile.cpp_pybinding, AsyncCompile.wait = original_binding, original_wait
