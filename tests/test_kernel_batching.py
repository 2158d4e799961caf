"""Inductor's CPU kernels built one library per compiled graph (training.kernel_batching)."""

import pytest
import torch
import torch.nn.functional as F

from training.acceleration import probe_compile
from training.kernel_batching import ENTRY, batchable, batched_kernel_builds, library_source

KERNEL = ('#include <torch/csrc/inductor/cpp_prefix.h>\n' + ENTRY +
          'const float* in_ptr0, float* out_ptr0)\n{\n    out_ptr0[0] = in_ptr0[0];\n}\n')


def test_a_library_renames_each_kernel_and_binds_it_by_its_index():
    source = library_source([(["const float*", "float*"], KERNEL), (["float*"], KERNEL)], "kernel")
    assert ENTRY not in source
    assert source.count('extern "C" void lanit_kernel_0(') == 1
    assert source.count('extern "C" void lanit_kernel_1(') == 1
    assert "lanit_kernel_0(lanit_data<float*>(args, 0), lanit_data<float*>(args, 1));" in source
    assert "lanit_kernel_1(lanit_data<float*>(args, 0));" in source
    assert '{"kernel_1", lanit_call_1, METH_VARARGS, nullptr}' in source
    assert "PyMODINIT_FUNC PyInit_kernel(void)" in source


def test_only_kernels_written_as_inductor_writes_them_are_batched():
    assert batchable(["const float*", "float*"], KERNEL)
    assert not batchable(["const float*", "int64_t"], KERNEL)  # a size: dynamic shapes
    assert not batchable(["float*"], KERNEL.replace(ENTRY, 'extern "C" void other('))
    assert not batchable(["float*"], KERNEL + KERNEL)


def two_reductions(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    y = F.leaky_relu(F.conv2d(x, weight, padding=1), 0.2)
    return y.mean(dim=(2, 3)).square().sum() + y.amax(dim=1).sum()


def forward_backward(fn, x, weight):
    x, weight = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = fn(x, weight)
    out.backward()
    return out.detach(), x.grad, weight.grad


def test_batched_builds_compute_what_inductors_own_builds_do(monkeypatch):
    from torch._inductor.async_compile import AsyncCompile
    from torch._inductor.codecache import CppPythonBindingsCodeCache as Loader

    sources = []
    load_async = Loader.load_async.__func__

    def spy(cls, main_code, *args, **kwargs):
        sources.append(main_code)
        return load_async(cls, main_code, *args, **kwargs)

    monkeypatch.setattr(Loader, "load_async", classmethod(spy))
    numbers = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 3, 8, 8, generator=numbers), torch.randn(4, 3, 3, 3, generator=numbers)

    torch._dynamo.reset()
    own = forward_backward(torch.compile(two_reductions, dynamic=False), x, weight)
    assert sources and not any("lanit_kernel_" in s for s in sources)
    original = AsyncCompile.cpp_pybinding
    sources.clear()
    torch._dynamo.reset()
    with batched_kernel_builds() as batching:
        together = forward_backward(torch.compile(two_reductions, dynamic=False), x, weight)
    assert batching.active and batching.worked
    assert AsyncCompile.cpp_pybinding is original  # put back
    libraries = [s for s in sources if "lanit_kernel_0" in s]
    assert libraries and len(libraries) == len(sources)  # every kernel went into a library
    assert any("lanit_kernel_1(" in s for s in libraries)  # one with two kernels or more
    for a, b in zip(own, together, strict=True):
        assert torch.equal(a, b)  # the same C++, the same flags: the same bits
    eager = forward_backward(two_reductions, x, weight)
    for a, b in zip(eager, together, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_library_that_does_not_build_leaves_its_kernels_to_inductor(monkeypatch):
    import training.kernel_batching as kernel_batching

    monkeypatch.setattr(kernel_batching, "library_source", lambda kernels, module: "#error broken\n")
    numbers = torch.Generator().manual_seed(1)
    x, weight = torch.randn(2, 3, 8, 8, generator=numbers), torch.randn(4, 3, 3, 3, generator=numbers)
    torch._dynamo.reset()
    with batched_kernel_builds() as batching:
        compiled = forward_backward(torch.compile(two_reductions, dynamic=False), x, weight)
    assert batching.active and batching.failures >= 2 and not batching.worked  # forward, backward
    for a, b in zip(forward_backward(two_reductions, x, weight), compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fails", ["batched", "always"])
def test_the_probe_falls_back_to_inductors_own_builds(monkeypatch, fails):
    import training.acceleration as acceleration
    from torch._inductor.async_compile import AsyncCompile

    original = AsyncCompile.cpp_pybinding
    probed = []

    def reason(device):
        batching = AsyncCompile.cpp_pybinding is not original
        probed.append(batching)
        return "the library did not load" if batching or fails == "always" else None

    monkeypatch.setattr(acceleration, "compile_unusable_reason", reason)
    expected = (False, None) if fails == "batched" else (False, "the library did not load")
    assert probe_compile(torch.device("cpu")) == expected
    assert probed == [True, False]  # batched first, then without
    monkeypatch.setattr(acceleration, "compile_unusable_reason", lambda device: None)
    assert probe_compile(torch.device("cpu")) == (True, None)
