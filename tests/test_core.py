"""Runtime core: config validation, network shapes, checkpoints and the multi-hot mixing rule."""

import json
import os
import re

import pytest
import torch

from lanit_rt import (
    CheckpointError,
    ConfigError,
    Discriminator,
    Generator,
    LanitConfig,
    MappingNetwork,
    StyleEncoder,
    latent_style_table,
    load_checkpoint,
    mix_styles,
    read_checkpoint_config,
    reference_style_table,
    save_checkpoint,
)
from lanit_rt.checkpoint import atomic_write_text, load_train_state, save_train_state


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_network_shapes_at_every_size(size):
    cfg = LanitConfig(domains=("a", "b", "c"), img_size=size, base_dim=4, max_dim=16, style_dim=8,
                      mapping_dim=16)
    x = torch.randn(2, 3, size, size)
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    mapping, encoder = MappingNetwork(cfg), StyleEncoder(cfg)
    style = mapping(torch.randn(2, cfg.latent_dim), w)
    assert style.shape == (2, 8)
    assert mapping.all_styles(torch.randn(5, cfg.latent_dim)).shape == (5, 3, 8)
    assert encoder(x, w).shape == (2, 8)
    assert Generator(cfg)(x, style).shape == (2, 3, size, size)
    assert Discriminator(cfg)(x).shape == (2, 3)
    assert cfg.generator_downsamples == {32: 1, 64: 2, 128: 3, 256: 4}[size]


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_blocks_pool_is_atens_avg_pool_to_the_bit(channels_last):
    """Forward, backward and the double backward R1 takes, against F.avg_pool2d(x, 2), bit for bit."""
    from lanit_rt.networks import avg_pool2  # noqa: PLC0415

    gen = torch.Generator().manual_seed(0)
    # magnitudes spread over ~6 decades, so any change in summation order shows in the last bits
    x0 = torch.randn(4, 6, 10, 12, generator=gen) * torch.exp(3 * torch.randn(4, 6, 10, 12, generator=gen))
    weight0 = torch.randn(6, 6, 3, 3, generator=gen)
    after0 = torch.randn(5, 6, 3, 3, generator=gen)  # a conv after the pool, as in the blocks
    if channels_last:
        x0 = x0.to(memory_format=torch.channels_last)
    results = []
    for pool in (lambda t: torch.nn.functional.avg_pool2d(t, 2), avg_pool2):
        x, weight, after = (t.clone().requires_grad_() for t in (x0, weight0, after0))
        y = pool(torch.nn.functional.conv2d(x, weight, padding=1))
        y = torch.nn.functional.conv2d(torch.nn.functional.leaky_relu(y, 0.2), after, padding=1)
        score = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()
        grad_x, = torch.autograd.grad(score, x, create_graph=True)
        # R1's path: the weight after the pool is reached through the pool's double backward
        grad_weights = torch.autograd.grad(grad_x.square().sum(), (weight, after))
        results.append((y.detach(), grad_x.detach(), *grad_weights))
    for ours, aten in zip(results[1], results[0], strict=True):
        assert torch.equal(ours, aten)
    assert results[1][0].is_contiguous(memory_format=torch.channels_last) == channels_last
    y = avg_pool2(x0.clone().requires_grad_())
    assert type(y.grad_fn).__name__ == "_Pool2Backward"
    for other in (torch.randn(1, 2, 5, 4), x0[:1].bfloat16(), x0[:1].half()):  # ATen's op for these
        assert torch.equal(avg_pool2(other), torch.nn.functional.avg_pool2d(other, 2))
    # the input gradient's layout is ATen's, and torch.func's transforms see the same function
    pooled_grads = []
    for pool in (lambda t: torch.nn.functional.avg_pool2d(t, 2), avg_pool2):
        x = x0.clone().requires_grad_()  # autograd.grad: as computed (.grad would copy to x's layout)
        pooled_grads.append(torch.autograd.grad(pool(x), x, torch.ones(4, 6, 5, 6))[0])
    assert pooled_grads[0].stride() == pooled_grads[1].stride()
    assert torch.equal(*pooled_grads)
    square_sum = lambda pool: lambda t: pool(t).square().sum()  # noqa: E731
    assert torch.equal(torch.func.grad(square_sum(avg_pool2))(x0),
                       torch.func.grad(square_sum(lambda t: torch.nn.functional.avg_pool2d(t, 2)))(x0))
    assert torch.equal(torch.vmap(avg_pool2)(x0.unsqueeze(1)).squeeze(1),
                       torch.nn.functional.avg_pool2d(x0, 2))


def test_default_256_sizes_match_stargan_v2():
    cfg = LanitConfig(domains=tuple("abcdefghij"), img_size=256)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert cfg.stem_dim == 64
    # exact official counts (tests/test_import.py builds the official-shaped nets and compares)
    assert count(Generator(cfg)) == 33_892_995
    assert count(StyleEncoder(cfg)) == 21_179_584
    assert count(Discriminator(cfg)) == 20_856_394
    assert cfg.mapping_dim == 512 and count(MappingNetwork(cfg)) == 9_004_672
    assert Generator(cfg).from_rgb.kernel_size == (3, 3) and Generator(cfg).from_rgb.padding == (1, 1)
    assert LanitConfig.for_arch("stargan-v2", cfg.domains, img_size=256) == cfg
    small = LanitConfig.for_arch("stargan-v2", cfg.domains, img_size=32)
    assert (small.stem_dim, small.max_dim, small.mapping_dim) == (512, 512, 512)
    with pytest.raises(ConfigError, match="unknown architecture"):
        LanitConfig.for_arch("stargan-v3", cfg.domains)


@pytest.mark.parametrize("bad, match", [
    (dict(domains=("only",)), "at least 2"),
    (dict(domains=("a", "a")), "unique"),
    (dict(domains=("a", "b"), img_size=48), "power of two"),
    (dict(domains=("a", "b"), img_size=512), "power of two"),
    (dict(domains=("a", "b"), style_dim=0), "style_dim"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ConfigError, match=match):
        LanitConfig(**bad)


def test_config_json_round_trip(tiny_config):
    again = LanitConfig.from_json(tiny_config.to_json())
    assert again == tiny_config
    with pytest.raises(ConfigError, match="unknown LanitConfig keys"):
        LanitConfig.from_dict({**tiny_config.to_dict(), "depth": 3})
    with pytest.raises(KeyError, match="known domains"):
        tiny_config.domain_index("green hair")


def test_mix_styles_is_the_normalised_weighted_mean():
    styles = torch.randn(2, 3, 4)
    w = torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    mixed = mix_styles(styles, w)
    torch.testing.assert_close(mixed[0], (styles[0, 0] + styles[0, 2]) / 2)
    torch.testing.assert_close(mixed[1], styles[1, 1])
    with pytest.raises(ValueError, match="at least one active"):
        mix_styles(styles, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="non-negative"):
        mix_styles(styles, -w)


def test_adain_table_mixing_equals_style_mixing(tiny_config):
    """Baking AdaIN gamma/beta per domain and mixing them equals mixing styles (the affine rule)."""
    g = Generator(tiny_config).eval()
    table = torch.randn(tiny_config.num_domains, tiny_config.style_dim)
    w = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    x = torch.randn(3, 3, 32, 32)
    direct = g(x, mix_styles(table, w))
    adain_table = g.adain_params(table)  # [D, P]
    baked = g(x, adain_params=mix_styles(adain_table, w))
    torch.testing.assert_close(baked, direct, atol=1e-5, rtol=1e-5)


def test_mapping_multi_hot_mixes_its_heads(tiny_config):
    mapping = MappingNetwork(tiny_config)
    z = torch.randn(4, tiny_config.latent_dim)
    per_domain = mapping.all_styles(z)
    w = torch.tensor([[1.0, 1.0, 0.0]]).expand(4, 3)
    torch.testing.assert_close(mapping(z, w), per_domain[:, :2].mean(dim=1))


def test_style_tables(tiny_config):
    mapping, encoder = MappingNetwork(tiny_config), StyleEncoder(tiny_config)
    latent = latent_style_table(mapping, num_z=64, seed=3, batch_size=16)
    assert latent.shape == (3, tiny_config.style_dim)
    z = torch.randn(64, tiny_config.latent_dim, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(latent, mapping.all_styles(z).mean(0), atol=1e-5, rtol=1e-5)

    images = torch.randn(6, 3, 32, 32)
    labels = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 0], [0, 0, 1], [1, 0, 0]]).float()
    table = reference_style_table(encoder, [(images[:4], labels[:4]), (images[4:], labels[4:])])
    with torch.no_grad():
        styles = encoder.all_styles(images)
    for k in range(3):
        on = labels[:, k] > 0
        torch.testing.assert_close(table[k], styles[on, k].mean(0), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no labelled image"):
        reference_style_table(encoder, [(images[:1], torch.tensor([[1.0, 0.0, 0.0]]))])


def _save_random(path, cfg):
    g, f, e = Generator(cfg), MappingNetwork(cfg), StyleEncoder(cfg)
    table = latent_style_table(f, num_z=32)
    save_checkpoint(path, cfg, g, f, e, latent_table=table, metadata={"step": 7})
    return g, f, e, table


def test_checkpoint_round_trip_is_bit_identical(tmp_path, tiny_config):
    g, f, e, table = _save_random(tmp_path / "run", tiny_config)
    for target in (tmp_path / "run", tmp_path / "run" / "model.safetensors"):
        model = load_checkpoint(target)
        assert model.config == tiny_config and model.metadata == {"step": 7}
        x = torch.randn(2, 3, 32, 32)
        w = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
        with torch.no_grad():
            expected = g.eval()(x, mix_styles(table, w))
            got = model.generator(x, model.domain_style(w))
            assert torch.equal(got, expected)
            z = torch.randn(2, tiny_config.latent_dim)
            assert torch.equal(model.mapping(z, w), f(z, w))
            assert torch.equal(model.style_encoder(x, w), e(x, w))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["domains"] == list(tiny_config.domains)
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_checkpoint_errors(tmp_path, tiny_config):
    with pytest.raises(CheckpointError, match="no LANIT checkpoint"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a safetensors"):
        load_checkpoint(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not a LANIT checkpoint"):
        load_checkpoint(tmp_path / "foreign.safetensors")
    # A format-1 checkpoint (1x1 RGB stem) is refused in one line that says what to do.
    save_file({"w": torch.zeros(2)}, str(tmp_path / "old.safetensors"),
              metadata={"format": "lanit-rt/1", "lanit_config": tiny_config.to_json()})
    with pytest.raises(CheckpointError, match=r"'lanit-rt/1' checkpoint from an older lanit-rt .* "
                                              r"retrain it, or re-import .* with lanit-import") as err:
        load_checkpoint(tmp_path / "old.safetensors")
    assert "\n" not in str(err.value)
    # Weights that do not match the header's config are rejected, not silently half-loaded.
    _save_random(tmp_path / "a", tiny_config)
    other = LanitConfig(**{**tiny_config.to_dict(), "max_dim": 16})
    _save_random(tmp_path / "b", other)
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "b" / "model.safetensors"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as f:
        header = f.metadata()
    save_file(tensors, str(tmp_path / "mixed.safetensors"), metadata=header)
    assert read_checkpoint_config(tmp_path / "mixed.safetensors")[0] == tiny_config
    with pytest.raises(CheckpointError, match="do not match its config") as exc:
        load_checkpoint(tmp_path / "mixed.safetensors")
    # the first mismatch itself, not torch's heading line, in one line, and how many more follow
    message = str(exc.value)
    assert "Error(s) in loading" not in message and "\n" not in message
    assert re.search(r"do not match its config: (Missing key\(s\)|size mismatch for).* \(and \d+ more\)$", message)


def test_foreign_errors_are_quoted_in_one_line(tmp_path, tiny_config, monkeypatch):
    from lanit_rt.errors import describe, first_line

    long = RuntimeError("\n  Error(s) in loading state_dict:\n\tMissing key(s) ...\n")
    assert first_line(long) == "Error(s) in loading state_dict:"
    assert describe(long) == "RuntimeError: Error(s) in loading state_dict:"
    assert first_line(OSError()) == "OSError" and describe(RuntimeError(" \n ")) == "RuntimeError"
    # A load error with a blank message still becomes the checkpoint's one-line error.
    _save_random(tmp_path / "run", tiny_config)

    def blank(*args, **kwargs):
        raise RuntimeError("")
    monkeypatch.setattr(Generator, "load_state_dict", blank)
    with pytest.raises(CheckpointError, match=r"weights under 'generator\.' do not match its config: "
                                              r"RuntimeError$"):
        load_checkpoint(tmp_path / "run")


def test_train_state_round_trip_and_safe_loading(tmp_path):
    state = {"step": 3, "rng": torch.get_rng_state(), "nested": {"w": torch.ones(2)}, "cfg": {"a": [1, 2]}}
    save_train_state(tmp_path, state)
    loaded = load_train_state(tmp_path)
    assert loaded["step"] == 3 and torch.equal(loaded["rng"], state["rng"])
    (tmp_path / "evil").mkdir()
    torch.save({"obj": tmp_path}, tmp_path / "evil" / "train_state.pt")
    # Refused or damaged files: one line with the cause, without torch's advice to load them with
    # weights_only=False (which runs whatever the file holds).
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "train_state.pt").write_bytes(b"garbage\n")
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "train_state.pt").write_bytes((tmp_path / "train_state.pt").read_bytes()[:300])
    for name, cause in (("evil", r"UnpicklingError: Unsupported global: GLOBAL pathlib\.\w*Path was not an allowed global by default"),
                        ("garbage", r"neither a zip archive, as torch\.save writes, nor a pickle: it starts with b'garbage\\n'"),
                        ("cut", r"RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory")):
        with pytest.raises(CheckpointError, match=rf"train_state\.pt is damaged or not a LANIT resume state \({cause}\)$") as caught:
            load_train_state(tmp_path / name)
        assert "\n" not in str(caught.value) and "weights_only" not in str(caught.value)


def _rewrite_checkpoint(src, dst, tensors=None, **header_updates):
    """Copy the checkpoint file `src` to `dst` with some tensors and header entries replaced."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), "pt") as f:
        header = {**f.metadata(), **header_updates}
    save_file({**load_file(str(src)), **(tensors or {})}, str(dst), metadata=header)
    return dst


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o027, 0o640)], ids=["022", "027"])
def test_atomic_writes_follow_the_umask(tmp_path, tiny_config, umask, expected):
    previous = os.umask(umask)
    try:
        _save_random(tmp_path / "run", tiny_config)
        atomic_write_text(tmp_path / "notes.txt", "hello\n")
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "run" / "model.safetensors") == expected
    assert _mode(tmp_path / "run" / "config.json") == expected
    assert _mode(tmp_path / "notes.txt") == expected


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    target = tmp_path / "eval.json"
    target.write_text("{}")
    os.chmod(target, 0o640)  # neither mkstemp's 0o600 nor the 0o644 a new file would get
    previous = os.umask(0o022)
    try:
        atomic_write_text(target, '{"fid": 1}\n')
    finally:
        os.umask(previous)
    assert target.read_text() == '{"fid": 1}\n' and _mode(target) == 0o640


def test_atomic_write_refuses_a_folder_and_leaves_no_temp_file(tmp_path):
    (tmp_path / "eval.json").mkdir()
    with pytest.raises(IsADirectoryError, match="eval.json"):
        atomic_write_text(tmp_path / "eval.json", "{}")
    assert os.listdir(tmp_path) == ["eval.json"]


def test_bad_metadata_json_is_a_checkpoint_error(tmp_path, tiny_config):
    _save_random(tmp_path / "run", tiny_config)
    src = tmp_path / "run" / "model.safetensors"
    broken = _rewrite_checkpoint(src, tmp_path / "broken.safetensors", metadata="{not json")
    with pytest.raises(CheckpointError, match="broken.safetensors.*invalid metadata JSON"):
        load_checkpoint(broken)
    listed = _rewrite_checkpoint(src, tmp_path / "listed.safetensors", metadata="[1, 2]")
    with pytest.raises(CheckpointError, match="metadata must be a JSON object"):
        read_checkpoint_config(listed)


@pytest.mark.parametrize("name", ["latent", "reference"])
def test_style_table_is_checked_on_load(tmp_path, tiny_config, name):
    _save_random(tmp_path / "run", tiny_config)
    src = tmp_path / "run" / "model.safetensors"
    d, s = tiny_config.num_domains, tiny_config.style_dim
    for shape in [(d, s + 1), (d + 1, s), (d * s,)]:
        bad = _rewrite_checkpoint(src, tmp_path / "shape.safetensors",
                                  {f"style_table.{name}": torch.zeros(shape)})
        with pytest.raises(CheckpointError, match=rf"{name} style table is \[.*\[num_domains, style_dim\]"):
            load_checkpoint(bad)
    for value in (float("nan"), float("inf")):
        table = torch.zeros(d, s)
        table[1, 2] = value
        bad = _rewrite_checkpoint(src, tmp_path / "nonfinite.safetensors", {f"style_table.{name}": table})
        with pytest.raises(CheckpointError, match=f"{name} style table holds NaN or infinite"):
            load_checkpoint(bad)
    good = _rewrite_checkpoint(src, tmp_path / "good.safetensors", {f"style_table.{name}": torch.ones(d, s)})
    assert torch.equal(getattr(load_checkpoint(good), f"{name}_table"), torch.ones(d, s))
