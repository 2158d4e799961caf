"""The first compile in a child process while the first steps train eagerly (training.background_compile)."""

import json
import signal
import sys

import pytest
import torch

from lanit_rt.config import LanitConfig
from lanit_rt.networks import Generator, StyleEncoder
from training.acceleration import compile_blocks, compiled_blocks
from training.background_compile import (BackgroundCompile, compiled_before, record_block_calls,
                                         replay_block_calls)

CONFIG = LanitConfig(domains=("a", "b"), img_size=32, style_dim=8, latent_dim=4, base_dim=8,
                     max_dim=16, mapping_dim=16)


def render_and_backward(generator: Generator, x: torch.Tensor, params: torch.Tensor) -> None:
    """What the training step does with the decoder: AdaIN parameters split into views of one
    tensor, gradients back to them."""
    content = generator.content(x)
    generator.render(content, params).square().mean().backward()


def test_calls_are_recorded_with_their_layouts_once_each():
    torch.manual_seed(0)
    generator = Generator(CONFIG)
    blocks = {name: block for name, block in compiled_blocks(generator, StyleEncoder(CONFIG)).items()
              if name in ("generator.decode.0", "generator.to_rgb")}
    x = torch.rand(3, 3, 32, 32)
    params = torch.randn(3, generator.adain_dim, requires_grad=True)
    generator.to_rgb.requires_grad_(False)
    with record_block_calls(blocks) as recording:
        render_and_backward(generator, x, params)
        render_and_backward(generator, x, params)  # the same calls again: recorded once
        with torch.no_grad():
            generator.render(generator.content(x[:2]), params[:2])
    assert recording.unsupported is None
    assert [(c["block"], c["grad"]) for c in recording.calls] == [
        ("generator.decode.0", True), ("generator.to_rgb", True),
        ("generator.decode.0", False), ("generator.to_rgb", False)]
    decode = recording.calls[0]
    assert decode["kwargs"] == {"impl": "ref"}
    h, gammas_betas = decode["args"]["tuple"]
    content = generator.content(x)
    index, shape, stride, offset, dtype, needs_grad = h["tensor"]
    assert (shape, stride, offset, dtype, needs_grad) == (
        list(content.shape), list(content.stride()), 0, "torch.float32", True)
    # The four AdaIN chunks are views of the one params tensor: one storage, their own offsets.
    views = [item["tensor"] for item in gammas_betas["tuple"]]
    assert len({view[0] for view in views}) == 1 and views[0][0] != index
    sizes = [content.shape[1]] * 4  # decode.0 keeps the content's width
    assert [view[1] for view in views] == [[3, size] for size in sizes]
    assert [view[3] for view in views] == [0, 16, 32, 48]
    assert all(view[2] == [generator.adain_dim, 1] for view in views)
    assert decode["storages"][views[0][0]] == [3 * generator.adain_dim, "torch.float32"]
    assert decode["weights_need_grad"] == [True] * len(list(blocks["generator.decode.0"].parameters()))
    assert recording.calls[1]["weights_need_grad"] == [False, False, False, False]
    json.dumps(recording.calls)  # it travels to the child as JSON


def test_an_argument_it_cannot_describe_is_reported_not_raised():
    block = torch.nn.Identity()
    with record_block_calls({"odd": block}) as recording:
        assert block(object) is object  # the call itself goes through
    assert recording.calls == [] and recording.unsupported == "odd: a block argument of type type"


class Probe(torch.nn.Module):
    """Notes what it is called with; counts the backward passes through it."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.seen, self.backwards = [], 0

    def forward(self, x, pair, scale=1.0):
        self.seen.append((torch.is_grad_enabled(), self.weight.requires_grad, scale,
                          [(t.shape, t.stride(), t.storage_offset(), t.dtype, t.requires_grad)
                           for t in (x, *pair)],
                          pair[0].untyped_storage().data_ptr() == pair[1].untyped_storage().data_ptr()))
        out = x * self.weight * scale + pair[0].sum() + pair[1].sum()
        if out.requires_grad:
            out.register_hook(self._count)
        return out

    def _count(self, grad):
        self.backwards += 1


def test_a_replay_makes_the_same_calls_with_random_numbers():
    probe = Probe()
    x = torch.randn(4, 6)[:, 1:4]  # strided, offset
    base = torch.randn(2, 10, dtype=torch.float64, requires_grad=True)
    pair = tuple(base.split(5, dim=1))
    probe.weight.requires_grad_(False)
    with record_block_calls({"probe": probe}) as recording:
        probe(x, pair, scale=2.0).sum().backward()
        with torch.no_grad():
            probe(x.contiguous(), pair)
    probe.weight.requires_grad_(True)
    recorded, probe.seen, probe.backwards = probe.seen, [], 0
    replay_block_calls({"probe": probe}, recording.calls, torch.device("cpu"))
    assert probe.seen == recorded  # grad mode, weights' flags, layouts, dtypes, shared storage
    assert probe.backwards == 1  # backward only where the output needed gradients
    assert probe.weight.requires_grad and probe.weight.grad is None  # left as they were


def test_a_replay_refuses_a_block_of_other_weights():
    probe = Probe()
    with record_block_calls({"probe": probe}) as recording:
        probe(torch.ones(2), (torch.ones(1), torch.ones(1)))
    with pytest.raises(ValueError, match="probe has 0 weights, the recorded call 1"):
        replay_block_calls({"probe": torch.nn.Identity()}, recording.calls, torch.device("cpu"))


def test_the_trainer_compiles_from_the_caches_the_child_filled(tmp_path, monkeypatch):
    """The child's graphs are the trainer's: after it ran, compiling the same blocks and making
    the training step's calls compiles nothing (inductor finds every graph in its cache)."""
    from torch._dynamo.utils import counters

    from training.kernel_batching import batched_kernel_builds

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(0)
    generator = Generator(CONFIG)
    blocks = {name: block for name, block in compiled_blocks(generator, StyleEncoder(CONFIG)).items()
              if name in ("generator.decode.0", "generator.to_rgb")}
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    params = torch.randn(3, generator.adain_dim, requires_grad=True)
    with record_block_calls(blocks) as recording:
        render_and_backward(generator, x, params)
    request = (CONFIG.to_dict(), recording.calls, torch.device("cpu"), torch.get_num_threads())
    assert compiled_before(*request) is None
    child = BackgroundCompile(*request)
    try:
        result = child.result()
    finally:
        child.close()
    assert (result.batched, result.reason) == (True, None) and result.seconds > 0
    # It left its marker for this request, and for no other.
    assert compiled_before(*request) == result
    assert compiled_before(*request[:3], request[3] + 1) is None
    assert compiled_before(dict(CONFIG.to_dict(), style_dim=4), *request[1:]) is None
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(blocks)
    with batched_kernel_builds():
        render_and_backward(generator, x, params)
    assert counters["inductor"]["fxgraph_cache_miss"] == 0
    # forward and backward of both blocks
    assert counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"] >= 2


def test_no_marker_where_inductor_keeps_no_caches(tmp_path, monkeypatch):
    """With inductor's FX-graph cache off the child compiles, but the next run would find nothing
    to load: it leaves no marker."""
    import torch._inductor.config

    import training.acceleration
    from training.background_compile import compile_and_replay

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(training.acceleration, "probe_compile", lambda device: (False, None))
    request = (CONFIG.to_dict(), [], torch.device("cpu"), torch.get_num_threads())
    child_request = {"model": request[0], "calls": [], "device": "cpu", "threads": request[3]}
    # (config.patch, not monkeypatch: inductor's config module does not survive monkeypatch's undo)
    with torch._inductor.config.patch(fx_graph_cache=False):
        assert compile_and_replay(child_request)["reason"] is None
    assert compiled_before(*request) is None
    with torch._inductor.config.patch(fx_graph_cache=True):
        compile_and_replay(child_request)
    assert compiled_before(*request) is not None


def test_a_marker_that_cannot_be_read_is_no_marker(tmp_path, monkeypatch):
    from training.background_compile import _leave_marker, _marker, _request

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    request = (CONFIG.to_dict(), [], torch.device("cpu"), 2)
    _leave_marker(_request(*request), {"batched": False, "reason": None, "seconds": 1.5})
    assert compiled_before(*request).batched is False
    marker = _marker(_request(*request))
    assert marker.parent.parent == tmp_path / "inductor" and [p.name for p in marker.parent.iterdir()] == [marker.name]
    for text in ("{\"batched\": tr", "[]", "{}"):
        marker.write_text(text)
        assert compiled_before(*request) is None
    # A torch without the (private) module that names the cache folder: no markers, no error.
    _leave_marker(_request(*request), {"batched": False, "reason": None, "seconds": 1.5})
    assert compiled_before(*request) is not None
    monkeypatch.setitem(sys.modules, "torch._inductor.runtime.cache_dir_utils", None)
    assert compiled_before(*request) is None
    _leave_marker(_request(*request), {"batched": True, "reason": None, "seconds": 1.5})


def test_a_child_that_fails_says_why_in_one_line():
    broken = dict(CONFIG.to_dict(), img_size=-1)
    child = BackgroundCompile(broken, [], torch.device("cpu"), threads=1)
    try:
        result = child.result()
    finally:
        child.close()
    assert not result.batched
    assert result.reason.startswith("its compiling process exited with code 1: ")
    assert "\n" not in result.reason and "img_size" in result.reason


def test_closing_stops_a_child_that_still_runs():
    child = BackgroundCompile(CONFIG.to_dict(), [], torch.device("cpu"), threads=1)
    child.close()
    assert child.done() and child.process.returncode == -signal.SIGKILL
    child.close()  # twice is fine
