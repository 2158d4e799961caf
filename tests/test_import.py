"""lanit-import: official-format StarGAN v2 / LANIT checkpoints -> lanit-rt, exactly.

The official networks are re-stated here, minimally, from the published architecture (StarGAN v2,
Choi et al. 2020, and LANIT's multi-hot heads): module and parameter names follow the released
checkpoints' state-dict keys, so `torch.save({"generator": ..., ...})` of these modules is a file in
the official format. The imported lanit-rt networks must reproduce their forward passes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lanit_export import import_cli
from lanit_export.official import LANIT_DOMAIN_SETS, convert_official, resolve_domains
from lanit_rt import load_checkpoint
from lanit_rt.config import LanitConfig
from lanit_rt.networks import Generator, MappingNetwork, StyleEncoder

SQRT2 = math.sqrt(2.0)


# ----------------------------------------------------------------- official-shaped reference nets

class RefResBlk(nn.Module):
    def __init__(self, c_in, c_out, normalize=False, downsample=False):
        super().__init__()
        self.normalize, self.downsample = normalize, downsample
        self.conv1 = nn.Conv2d(c_in, c_in, 3, padding=1)
        self.conv2 = nn.Conv2d(c_in, c_out, 3, padding=1)
        if normalize:
            self.norm1 = nn.InstanceNorm2d(c_in, affine=True)
            self.norm2 = nn.InstanceNorm2d(c_in, affine=True)
        if c_in != c_out:
            self.conv1x1 = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x):
        skip = self.conv1x1(x) if hasattr(self, "conv1x1") else x
        if self.downsample:
            skip = F.avg_pool2d(skip, 2)
        h = self.norm1(x) if self.normalize else x
        h = self.conv1(F.leaky_relu(h, 0.2))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        h = self.norm2(h) if self.normalize else h
        h = self.conv2(F.leaky_relu(h, 0.2))
        return (skip + h) / SQRT2


class RefAdaIN(nn.Module):
    def __init__(self, style_dim, channels):
        super().__init__()
        self.fc = nn.Linear(style_dim, 2 * channels)

    def forward(self, x, s):
        gamma, beta = self.fc(s)[:, :, None, None].chunk(2, dim=1)
        return (1 + gamma) * F.instance_norm(x, eps=1e-5) + beta


class RefAdainResBlk(nn.Module):
    def __init__(self, c_in, c_out, style_dim, upsample=False, w_hpf=0):
        super().__init__()
        self.upsample, self.w_hpf = upsample, w_hpf
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.norm1 = RefAdaIN(style_dim, c_in)
        self.norm2 = RefAdaIN(style_dim, c_out)
        if c_in != c_out:
            self.conv1x1 = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x, s):
        up = (lambda t: F.interpolate(t, scale_factor=2, mode="nearest")) if self.upsample else (lambda t: t)
        h = self.conv1(up(F.leaky_relu(self.norm1(x, s), 0.2)))
        h = self.conv2(F.leaky_relu(self.norm2(h, s), 0.2))
        if self.w_hpf:
            return h
        skip = up(x)
        skip = self.conv1x1(skip) if hasattr(self, "conv1x1") else skip
        return (h + skip) / SQRT2


class RefGenerator(nn.Module):
    def __init__(self, img_size, style_dim=64, max_dim=512, dim_in=None, w_hpf=0):
        super().__init__()
        dim = dim_in or 2 ** 14 // img_size
        self.from_rgb = nn.Conv2d(3, dim, 3, padding=1)
        self.to_rgb = nn.Sequential(nn.InstanceNorm2d(dim, affine=True), nn.LeakyReLU(0.2),
                                    nn.Conv2d(dim, 3, 1))
        self.encode, self.decode = nn.ModuleList(), nn.ModuleList()
        for _ in range(int(math.log2(img_size)) - 4 + (1 if w_hpf else 0)):
            out = min(2 * dim, max_dim)
            self.encode.append(RefResBlk(dim, out, normalize=True, downsample=True))
            self.decode.insert(0, RefAdainResBlk(out, dim, style_dim, upsample=True, w_hpf=w_hpf))
            dim = out
        for _ in range(2):
            self.encode.append(RefResBlk(dim, dim, normalize=True))
            self.decode.insert(0, RefAdainResBlk(dim, dim, style_dim, w_hpf=w_hpf))
        if w_hpf:
            self.hpf = nn.Module()
            self.hpf.register_buffer("filter", torch.ones(3, 3))

    def forward(self, x, s):
        h = self.from_rgb(x)
        for block in self.encode:
            h = block(h)
        for block in self.decode:
            h = block(h, s)
        return self.to_rgb(h)


def multi_hot_mix(styles, y):
    """LANIT's rule for multi-hot targets: styles [N, D, S], y [N, D] -> sum_k y_k s_k / sum_k y_k."""
    return (styles * y[..., None]).sum(1) / y.sum(1, keepdim=True)


class RefMappingNetwork(nn.Module):
    def __init__(self, latent_dim=16, style_dim=64, num_domains=2, hidden=512):
        super().__init__()
        layers = [nn.Linear(latent_dim, hidden), nn.ReLU()]
        for _ in range(3):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.shared = nn.Sequential(*layers)
        self.unshared = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, style_dim))
            for _ in range(num_domains))

    def forward(self, z, y):
        h = self.shared(z)
        return multi_hot_mix(torch.stack([head(h) for head in self.unshared], 1), y)


class RefStyleEncoder(nn.Module):
    def __init__(self, img_size, style_dim=64, num_domains=2, max_dim=512, dim_in=None):
        super().__init__()
        dim = dim_in or 2 ** 14 // img_size
        blocks = [nn.Conv2d(3, dim, 3, padding=1)]
        for _ in range(int(math.log2(img_size)) - 2):
            out = min(2 * dim, max_dim)
            blocks.append(RefResBlk(dim, out, downsample=True))
            dim = out
        blocks += [nn.LeakyReLU(0.2), nn.Conv2d(dim, dim, 4), nn.LeakyReLU(0.2)]
        self.shared = nn.Sequential(*blocks)
        self.unshared = nn.ModuleList(nn.Linear(dim, style_dim) for _ in range(num_domains))

    def forward(self, x, y):
        h = self.shared(x).flatten(1)
        return multi_hot_mix(torch.stack([head(h) for head in self.unshared], 1), y)


def official_nets(img_size, num_domains, *, dim_in=None, max_dim=512, hidden=512, style_dim=64,
                  latent_dim=16, w_hpf=0, seed=0):
    torch.manual_seed(seed)
    nets = {
        "generator": RefGenerator(img_size, style_dim, max_dim, dim_in, w_hpf),
        "mapping_network": RefMappingNetwork(latent_dim, style_dim, num_domains, hidden),
        "style_encoder": RefStyleEncoder(img_size, style_dim, num_domains, max_dim, dim_in),
    }
    with torch.no_grad():  # move the norm affines off (1, 0) so swapped gamma / beta would show
        for net in nets.values():
            for name, p in net.named_parameters():
                if ".norm" in name or name.startswith("to_rgb.0"):
                    p.add_(0.2 * torch.randn_like(p))
    return {k: v.eval() for k, v in nets.items()}


def save_official(path, nets, prefix="", extra=None):
    """The released layout: {net name: state dict}; DataParallel-saved files prefix `module.`."""
    data = {name: {prefix + k: v for k, v in net.state_dict().items()} for name, net in nets.items()}
    data.update(extra or {})
    torch.save(data, path)
    return path


# --------------------------------------------------------------------------------------- tests

def check_forward_matches(nets, run, img_size, num_domains, latent_dim=16):
    model = load_checkpoint(run)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, img_size, img_size, generator=gen) * 2 - 1
    z = torch.randn(2, latent_dim, generator=gen)
    y = torch.zeros(2, num_domains)
    y[0, 1] = 1
    y[1, [0, num_domains - 1]] = 1  # a multi-hot target
    with torch.no_grad():
        s_ref = nets["mapping_network"](z, y)
        s_ours = model.mapping(z, y)
        e_ref = nets["style_encoder"](x, y)
        e_ours = model.style_encoder(x, y)
        out_ref = nets["generator"](x, s_ref)
        out_ours = model.generator(x, s_ref)
    assert (s_ours - s_ref).abs().max() <= 1e-5
    assert (e_ours - e_ref).abs().max() <= 1e-5
    assert (out_ours - out_ref).abs().max() <= 1e-4
    assert out_ref.abs().mean() > 1e-2, "a trivial output would hide a wrong import"
    return model


@pytest.mark.parametrize("img_size, widths", [
    (32, {}),                                         # the official widths: 512 channels, mapping 512
    (256, {"dim_in": 8, "max_dim": 32, "hidden": 64}),  # every block of the 256 px layout, narrow
])
def test_import_matches_the_official_forward_pass(tmp_path, img_size, widths):
    d = 3
    nets = official_nets(img_size, d, **widths)
    ckpt = save_official(tmp_path / "100000_nets_ema.ckpt", nets, prefix="module.",
                         extra={"promptLearner": {"prefix_tokens.pre0": torch.zeros(3, 512)}})
    run = tmp_path / "run"
    assert import_cli.main([str(ckpt), "--domains", "blond hair, black hair,smiling", "--out", str(run),
                            "--num-z", "64"]) == 0
    model = check_forward_matches(nets, run, img_size, d)
    cfg = model.config
    assert cfg.domains == ("blond hair", "black hair", "smiling") and cfg.img_size == img_size
    if not widths:
        assert cfg == LanitConfig.for_arch("stargan-v2", cfg.domains, img_size=img_size)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    for ours, name in ((model.generator, "generator"), (model.mapping, "mapping_network"),
                       (model.style_encoder, "style_encoder")):
        assert count(ours) == count(nets[name]), name
    # the latent table is the mean mapping-network style per domain over the imported latents
    assert model.latent_table.shape == (d, 64)
    assert model.metadata["imported_from"] == "100000_nets_ema.ckpt"


def test_imported_run_exports_to_onnx_and_translates(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from lanit_export import cli as export_cli
    from lanit_rt import Translator

    nets = official_nets(64, 2, dim_in=8, max_dim=16, hidden=32)
    ckpt = save_official(tmp_path / "nets_ema.ckpt", nets)
    run = tmp_path / "run"
    assert import_cli.main([str(ckpt), "--domains", "cat,dog", "--out", str(run), "--num-z", "32"]) == 0
    assert export_cli.main([str(run), "--onnx", str(run / "model.onnx")]) == 0
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    ort = Translator.from_checkpoint(run, backend="onnxruntime")
    ref = Translator.from_checkpoint(run)
    table = load_checkpoint(run).latent_table
    for target, style in (("cat", table[0]), (["cat", "dog"], table.mean(0))):  # one- and multi-hot
        out_ort = torch.as_tensor(ort.translate(x, target))
        out_ref = torch.as_tensor(ref.translate(x, target))
        assert out_ort.shape == x.shape and (out_ort - out_ref).abs().max() <= 1e-4
        # the official generator with the domain's latent style gives the same images (the
        # Translator returns images, clamped to [-1, 1])
        with torch.no_grad():
            official = nets["generator"](x, style.expand(2, -1)).clamp(-1, 1)
        assert (out_ort - official).abs().max() <= 1e-4


def test_domain_sets_by_name():
    assert resolve_domains("lanit:celeba-hq-10") == (
        "bangs", "blond hair", "black hair", "smiling", "arched eyebrows", "heavy makeup", "mustache",
        "straight hair", "wearing lipstick", "male")
    assert len(resolve_domains("lanit:animal-faces-10")) == 10
    assert all(len(set(texts)) == len(texts) for texts in LANIT_DOMAIN_SETS.values())
    assert all(len(texts) == int(name.rsplit("-", 1)[1]) for name, texts in LANIT_DOMAIN_SETS.items())


def run_import(tmp_path, capsys, *args):
    code = import_cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lanit-import: error: "), err
    return code, err


def test_bad_files_give_one_line_errors(tmp_path, capsys):
    out = tmp_path / "run"
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    code, err = run_import(tmp_path, capsys, text, "--domains", "a,b", "--out", out)
    assert code == 1 and "not a PyTorch checkpoint" in err
    assert not out.exists()  # the folder made for --out goes again
    assert "(neither a zip archive, as torch.save writes, nor a pickle: it starts with b'not a checkp')" in err
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    code, err = run_import(tmp_path, capsys, empty, "--domains", "a,b", "--out", out)
    assert code == 1 and "not a PyTorch checkpoint (the file is empty)" in err
    # A pickle that the safe loader refuses: torch's own cause, not its first line, which advises
    # weights_only=False (unsafe here).
    evil = tmp_path / "evil.ckpt"
    torch.save({"path": tmp_path}, evil)
    code, err = run_import(tmp_path, capsys, evil, "--domains", "a,b", "--out", out)
    assert "(UnpicklingError: Unsupported global" in err and "weights_only` set to `False`" not in err, err
    other = tmp_path / "other.ckpt"
    torch.save({"model": {"w": torch.zeros(1)}}, other)
    code, err = run_import(tmp_path, capsys, other, "--domains", "a,b", "--out", out)
    assert code == 1 and "not a StarGAN v2 / LANIT network checkpoint" in err and "model" in err
    code, err = run_import(tmp_path, capsys, tmp_path / "missing.ckpt", "--domains", "a,b", "--out", out)
    assert code == 1 and "no checkpoint file" in err
    # lanit-rt's own files: a short list of what they hold, and that they need no import.
    ours = tmp_path / "train_state.pt"
    torch.save({"nets": {}, "ema": {}, "step": 3, **{f"extra{i}": i for i in range(20)}}, ours)
    code, err = run_import(tmp_path, capsys, ours, "--domains", "a,b", "--out", out)
    assert code == 1 and "found [ema, extra0, extra1, extra10, extra11, extra12, ... (23 keys)]; it is " \
                         "lanit-rt's own" in err and "needs no import" in err and len(err) < 500, err

    nets = official_nets(32, 3, dim_in=8, max_dim=16, hidden=16)
    good = save_official(tmp_path / "good.ckpt", nets)
    code, err = run_import(tmp_path, capsys, good, "--domains", "a,b", "--out", out)
    assert code == 1 and "trained with 3 domains but --domains gives 2" in err
    code, err = run_import(tmp_path, capsys, good, "--domains", "lanit:celeba-hq-99", "--out", out)
    assert code == 1 and "unknown LANIT domain set" in err
    code, err = run_import(tmp_path, capsys, good, "--domains", "a,b,c")
    assert code == 2 and "required" in err

    hpf = save_official(tmp_path / "hpf.ckpt", official_nets(32, 3, dim_in=8, max_dim=16, hidden=16,
                                                            w_hpf=1))
    code, err = run_import(tmp_path, capsys, hpf, "--domains", "a,b,c", "--out", out)
    assert code == 1 and "w_hpf > 0" in err and "not implement" in err
    assert not out.exists()

    assert import_cli.main([str(good), "--domains", "a,b,c", "--out", str(out), "--num-z", "8"]) == 0
    capsys.readouterr()
    code, err = run_import(tmp_path, capsys, good, "--domains", "a,b,c", "--out", out)
    assert code == 2 and "already holds a checkpoint" in err


def test_convert_rejects_a_mismatched_network(tmp_path):
    nets = official_nets(32, 2, dim_in=8, max_dim=16, hidden=16)
    data = {k: v.state_dict() for k, v in nets.items()}
    data["generator"]["from_rgb.weight"] = torch.zeros(8, 3, 1, 1)  # lanit-rt format 1's 1x1 stem
    torch.save(data, tmp_path / "x.ckpt")
    with pytest.raises(Exception, match="not the official 3x3 RGB stem"):
        convert_official(tmp_path / "x.ckpt", ("a", "b"))


def test_lanit_rt_networks_have_exactly_the_official_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    for size in (32, 64, 128, 256):
        cfg = LanitConfig.for_arch("stargan-v2", tuple("abcdefghij"), img_size=size)
        assert count(Generator(cfg)) == count(RefGenerator(size)), size
        assert count(StyleEncoder(cfg)) == count(RefStyleEncoder(size, num_domains=10)), size
        assert count(MappingNetwork(cfg)) == count(RefMappingNetwork(num_domains=10)), size


def test_console_script_is_declared():
    import importlib
    from pathlib import Path

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())[
        "project"]["scripts"]
    module, _, func = scripts["lanit-import"].partition(":")
    assert getattr(importlib.import_module(module), func) is import_cli.main
    assert import_cli.main(["--list-domain-sets"]) == 0


def test_a_layout_mismatch_quotes_torchs_message_once(tmp_path):
    from lanit_export.official import ImportCheckpointError, _load

    net = nn.Linear(2, 2)
    with pytest.raises(ImportCheckpointError) as info:
        _load(net, {"weight": torch.zeros(3, 2), "bias": torch.zeros(2)}, "generator", tmp_path / "x.ckpt")
    message = str(info.value)
    assert "\n" not in message and "size mismatch for weight" in message
    assert message.count("Error(s) in loading state_dict") == 1
