"""lanit_rt.Translator: every input kind and domain spec against direct network calls, the
onnxruntime backend against the torch backend, clear errors, and thread safety."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lanit_rt import (
    CheckpointError,
    Generator,
    LanitConfig,
    MappingNetwork,
    StyleEncoder,
    Translator,
    latent_style_table,
    load_checkpoint,
    save_checkpoint,
)
from lanit_rt.backends.base import ArtifactError

CONFIG = LanitConfig(domains=("blond hair", "black hair", "beard"), img_size=32, base_dim=8,
                     max_dim=32, style_dim=16, latent_dim=8, mapping_dim=32)
SIZE = CONFIG.img_size
D = CONFIG.num_domains


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model gains nothing from intra-op threads, and on a busy 2-core machine their
    spin-waiting makes every call many times slower; the previous setting is restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(1234)
    generator, mapping, encoder = Generator(CONFIG), MappingNetwork(CONFIG), StyleEncoder(CONFIG)
    # An untrained model barely reacts to its style: widen the style paths so styles, seeds and
    # references change the output far beyond the test tolerances, and shrink the output layer so
    # pixels stay inside [-1, 1] (clamping would hide differences).
    with torch.no_grad():
        mapping.head_weights[-1].mul_(15)
        encoder.heads.weight.mul_(10)
        generator.style_to_adain.weight.mul_(2)
        generator.to_rgb[-1].weight.mul_(0.3)
    table = latent_style_table(mapping, num_z=64, seed=0)
    folder = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(folder, CONFIG, generator, mapping, encoder, latent_table=table,
                    metadata={"test": True})
    return folder


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def translator(checkpoint):
    return Translator.from_checkpoint(checkpoint)


def _images(n: int, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=gen) * 2 - 1


def _uint8_images(n: int, seed: int = 0, h: int = SIZE, w: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def _to_float(array: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1], written independently of lanit_rt.images."""
    return torch.from_numpy(array.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def _direct(model, images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The reference: the checkpoint's generator with the multi-hot mix of its style table."""
    return model.generator(images, model.domain_style(weights)).clamp(-1, 1)


def _assert_uint8_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.uint8 and actual.shape == expected.shape
    # Rounding of values that sit on a .5 boundary may differ by one level after float noise.
    assert np.abs(actual.astype(int) - expected.astype(int)).max() <= 1


def test_domains_and_exported_api(translator):
    import lanit_rt
    assert lanit_rt.Translator is Translator
    assert translator.domains == CONFIG.domains
    assert translator.backend.name == "torch"
    assert translator.backend.adain_table.shape == (D, translator.backend.generator.adain_dim)


@pytest.mark.parametrize("spec, weights", [
    ("black hair", [[0, 1, 0]] * 3),
    (2, [[0, 0, 1]] * 3),
    (["blond hair", "beard"], [[0.5, 0, 0.5]] * 3),
    ({"blond hair": 3.0, "black hair": 1.0}, [[0.75, 0.25, 0]] * 3),
    (np.array([1.0, 1.0, 1.0]), [[1 / 3] * 3] * 3),
    (torch.tensor([[1.0, 0, 0], [0, 2.0, 2.0], [0, 0, 5.0]]), [[1, 0, 0], [0, 0.5, 0.5], [0, 0, 1]]),
])
def test_domain_specs_match_direct_generator(translator, model, spec, weights):
    images = _images(3)
    out = translator.translate(images, spec)
    expected = _direct(model, images, torch.tensor(weights, dtype=torch.float32))
    assert out.shape == images.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert out.min() >= -1 and out.max() <= 1


def test_domain_targets_change_the_output(translator):
    images = _images(2)
    first = translator.translate(images, "blond hair")
    second = translator.translate(images, "beard")
    assert (first - second).abs().max() > 1e-3


def test_input_kinds_match_direct_generator(translator, model):
    arrays = _uint8_images(3, seed=1)
    w = torch.tensor([[0.0, 0.5, 0.5]])
    expected = _to_uint8(_direct(model, _to_float(arrays), w.expand(3, D)))
    spec = ["black hair", "beard"]

    stacked = translator.translate(arrays, spec)
    assert isinstance(stacked, np.ndarray)
    _assert_uint8_close(stacked, expected)

    as_list = translator.translate(list(arrays), spec)
    assert isinstance(as_list, list) and len(as_list) == 3
    _assert_uint8_close(np.stack(as_list), expected)

    single = translator.translate(arrays[1], spec)
    _assert_uint8_close(single, expected[1])

    pil = translator.translate([Image.fromarray(a) for a in arrays], spec)
    assert all(isinstance(p, Image.Image) and p.mode == "RGB" and p.size == (SIZE, SIZE) for p in pil)
    _assert_uint8_close(np.stack([np.asarray(p) for p in pil]), expected)

    single_pil = translator.translate(Image.fromarray(arrays[2]), spec)
    assert isinstance(single_pil, Image.Image)
    _assert_uint8_close(np.asarray(single_pil), expected[2])

    floats = _to_float(arrays)
    expected_float = _direct(model, floats, w.expand(3, D))
    one = translator.translate(floats[0], spec)
    assert one.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(one, expected_float[0], atol=1e-5, rtol=0)
    tensors = translator.translate(list(floats.double()), spec)
    assert isinstance(tensors, list) and all(t.dtype == torch.float64 for t in tensors)
    torch.testing.assert_close(torch.stack(tensors).float(), expected_float, atol=1e-5, rtol=0)


def test_any_size_is_resized_and_optionally_restored(translator, model):
    arrays = _uint8_images(2, seed=2, h=48, w=40)
    out = translator.translate(arrays, "beard")
    assert out.shape == (2, SIZE, SIZE, 3)
    resized = F.interpolate(_to_float(arrays), size=(SIZE, SIZE), mode="bilinear",
                            align_corners=False, antialias=True)
    _assert_uint8_close(out, _to_uint8(_direct(model, resized, torch.tensor([[0.0, 0, 1]]).expand(2, D))))

    back = translator.translate(arrays, "beard", resize_back=True)
    assert back.shape == (2, 48, 40, 3)
    translated = _direct(model, resized, torch.tensor([[0.0, 0, 1]]).expand(2, D))
    restored_size = F.interpolate(translated, size=(48, 40), mode="bilinear", align_corners=False,
                                  antialias=True)  # back to the input size the way it came in
    _assert_uint8_close(back, _to_uint8(restored_size))

    mixed = [arrays[0], _uint8_images(1, seed=3, h=20, w=70)[0]]
    restored = translator.translate(mixed, "beard", resize_back=True)
    assert [r.shape for r in restored] == [(48, 40, 3), (20, 70, 3)]
    at_model_size = translator.translate(mixed, "beard")
    assert [r.shape for r in at_model_size] == [(SIZE, SIZE, 3)] * 2
    np.testing.assert_array_equal(at_model_size[0], out[0])


def test_seed_and_z_are_deterministic_and_match_mapping(translator, model):
    images = _images(2, seed=4)
    first = translator.translate(images, ["blond hair", "beard"], seed=7)
    again = translator.translate(images, ["blond hair", "beard"], seed=7)
    other = translator.translate(images, ["blond hair", "beard"], seed=8)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert (first - other).abs().max() > 1e-3

    z = torch.randn(2, CONFIG.latent_dim, generator=torch.Generator().manual_seed(7))
    w = torch.tensor([[0.5, 0, 0.5]] * 2)
    with torch.no_grad():
        expected = model.generator(images, model.mapping(z, w)).clamp(-1, 1)
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(translator.translate(images, ["blond hair", "beard"], z=z), expected,
                               atol=1e-5, rtol=0)


def test_reference_guided_matches_style_encoder(translator, model):
    images, refs = _images(3, seed=5), _images(3, seed=6)
    w = torch.tensor([[0.0, 1.0, 0.0]] * 3)
    with torch.no_grad():
        expected = model.generator(images, model.style_encoder(refs, w)).clamp(-1, 1)
        expected_one = model.generator(images, model.style_encoder(refs[:1].expand(3, -1, -1, -1), w))
    out = translator.translate(images, "black hair", reference=refs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(translator.translate(images, "black hair", reference=refs),
                               out, atol=0, rtol=0)
    broadcast = translator.translate(images, "black hair", reference=refs[0])
    torch.testing.assert_close(broadcast, expected_one.clamp(-1, 1), atol=1e-5, rtol=0)
    uint8_ref = translator.translate(images, "black hair", reference=list(_uint8_images(3, seed=9)))
    assert (uint8_ref - out).abs().max() > 1e-3


def test_explicit_style_matches_generator(translator, model):
    images = _images(2, seed=10)
    style = torch.randn(2, CONFIG.style_dim)
    with torch.no_grad():
        expected = model.generator(images, style).clamp(-1, 1)
    torch.testing.assert_close(translator.translate(images, style=style), expected, atol=1e-5, rtol=0)


def test_low_precision_and_channels_last(checkpoint, translator):
    images = _images(2, seed=11)
    fp32 = translator.translate(images, "blond hair")
    channels_last = Translator.from_checkpoint(checkpoint, channels_last=True)
    channels_last.warmup((2, 3))
    assert sorted(channels_last.backend._slots) == [2, 3]
    torch.testing.assert_close(channels_last.translate(images, "blond hair"), fp32, atol=1e-5, rtol=0)
    bf16 = Translator.from_checkpoint(checkpoint, dtype="bf16")
    assert bf16.backend.generator.from_rgb.weight.dtype == torch.bfloat16
    low = bf16.translate(images, "blond hair")
    assert low.dtype == torch.float32
    assert (low - fp32).abs().mean() < 0.02


def test_fused_kernel_impl_matches_reference(checkpoint, translator):
    """impl="triton" routes every AdaIN/IN conv through the Triton kernels (interpreted on CPU)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    images = _images(1, seed=12)
    fused = Translator.from_checkpoint(checkpoint, impl="triton")
    torch.testing.assert_close(fused.translate(images, ["black hair", "beard"]),
                               translator.translate(images, ["black hair", "beard"]), atol=1e-4, rtol=0)


def test_unknown_domains_and_bad_specs(translator):
    images = _images(1)
    with pytest.raises(KeyError, match="known domains.*blond hair.*black hair.*beard"):
        translator.translate(images, "red hair")
    with pytest.raises(KeyError, match="red hair"):
        translator.translate(images, ["beard", "red hair"])
    with pytest.raises(KeyError, match="known domains"):
        translator.translate(images, {"smiling": 1.0})
    with pytest.raises(IndexError, match="out of range"):
        translator.translate(images, 3)
    with pytest.raises(ValueError, match="at least one active domain"):
        translator.translate(images, torch.zeros(1, D))
    with pytest.raises(ValueError, match="non-negative|>= 0"):
        translator.translate(images, {"beard": -1.0})
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        translator.translate(images, torch.ones(1, D + 1))
    with pytest.raises(ValueError, match="rows for 2 images"):
        translator.translate(_images(2), torch.ones(3, D))
    with pytest.raises(ValueError, match="pass domains="):
        translator.translate(images)
    with pytest.raises(ValueError, match="empty domain list"):
        translator.translate(images, [])
    with pytest.raises(ValueError, match="not both"):
        translator.translate(images, "beard", style=torch.zeros(1, CONFIG.style_dim))
    with pytest.raises(ValueError, match="at most one"):
        translator.translate(images, "beard", seed=1, reference=images)
    with pytest.raises(ValueError, match="reference images for 2 images; pass 1 or 2$"):
        translator.translate(_images(2), "beard", reference=_images(3))
    with pytest.raises(ValueError, match="2 reference images for 1 image; pass 1$"):
        translator.translate(_images(1), "beard", reference=_images(2))


def test_images_of_any_mode_are_read_as_training_reads_them(translator, tmp_path):
    """A transparent palette PNG (what the default Twemoji data is), RGBA and grey images, as PIL
    images or numpy arrays, translate exactly as their RGB conversion by the trainer's loader."""
    from training.data import load_rgb

    rgb = _uint8_images(1, seed=7)[0]
    alpha = np.random.default_rng(8).integers(0, 256, size=(SIZE, SIZE, 1), dtype=np.uint8)
    alpha[: SIZE // 2] = 0  # fully transparent rows must come out white, whatever RGB they hold
    rgba = np.concatenate([rgb, alpha], axis=2)
    palette = Image.fromarray(rgb).quantize(16)
    palette.info["transparency"] = 0  # palette entry 0 is transparent
    palette.save(tmp_path / "palette.png")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    grey = rgb[:, :, 0]

    def same(image, expected_rgb):
        ours = translator.translate(image, "beard", seed=0)
        want = translator.translate(expected_rgb, "beard", seed=0)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(want))

    loaded = np.asarray(load_rgb(tmp_path / "palette.png"))
    with Image.open(tmp_path / "palette.png") as opened:
        assert opened.mode == "P"
        out = translator.translate(opened, "beard", seed=0)
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(translator.translate(loaded, "beard", seed=0)))
    assert (loaded[np.asarray(palette) == 0] == 255).all()

    from_file = np.asarray(load_rgb(tmp_path / "rgba.png"))
    assert (from_file[: SIZE // 2] == 255).all() and not (from_file[SIZE // 2:] == 255).all()
    same(Image.fromarray(rgba, "RGBA"), from_file)
    same(rgba, from_file)  # numpy RGBA: composited the same way, to the same uint8 values
    same(Image.fromarray(grey, "L"), np.repeat(grey[:, :, None], 3, axis=2))
    same(grey, np.repeat(grey[:, :, None], 3, axis=2))

    # A colour key (PNG tRNS) in grey and RGB images: its pixels are transparent, so white.
    key = rgb[0, 0]
    Image.fromarray(rgb).save(tmp_path / "keyed_rgb.png", transparency=tuple(int(v) for v in key))
    Image.fromarray(grey, "L").save(tmp_path / "keyed_grey.png", transparency=int(grey[0, 0]))
    for name, pixels, keyed in (("keyed_rgb.png", rgb, (rgb == key).all(axis=2)),
                                ("keyed_grey.png", np.repeat(grey[:, :, None], 3, axis=2),
                                 grey == grey[0, 0])):
        want = pixels.copy()
        want[keyed] = 255
        assert 0 < keyed.sum() < keyed.size / 2
        np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / name)), want)
        same(tmp_path / name, want)
        with Image.open(tmp_path / name) as opened:
            opened.load()
            assert "transparency" in opened.info
            same(opened, want)


def test_image_files_are_read_as_training_reads_them(translator, tmp_path):
    """Paths (str or Path, one or a list, as images or as the reference) translate exactly as the
    trainer's loader reads the files, EXIF orientation included, and come back as PIL images."""
    from training.data import load_rgb

    rgba = np.concatenate([_uint8_images(1, seed=3)[0], np.full((SIZE, SIZE, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "icon.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise
    Image.fromarray(_uint8_images(1, seed=4, h=SIZE, w=2 * SIZE)[0]).save(
        tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    icon, phone = tmp_path / "icon.png", tmp_path / "phone.jpg"
    assert load_rgb(phone).size == (SIZE, 2 * SIZE)  # turned: the file's SIZE rows are now columns

    def array(image):
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        return np.asarray(image)

    for path in (icon, str(phone)):
        want = translator.translate(load_rgb(path), "beard", seed=0, resize_back=True)
        got = translator.translate(path, "beard", seed=0, resize_back=True)
        np.testing.assert_array_equal(array(got), array(want))
    assert translator.translate(phone, "beard", resize_back=True).size == (SIZE, 2 * SIZE)
    both = translator.translate([str(icon), phone], "blond hair")
    assert isinstance(both, list) and len(both) == 2
    np.testing.assert_array_equal(array(both[1]), array(translator.translate(load_rgb(phone), "blond hair")))
    np.testing.assert_array_equal(array(translator.translate(icon, "beard", reference=phone)),
                                  array(translator.translate(load_rgb(icon), "beard",
                                                             reference=load_rgb(phone))))

    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "cut.png").write_bytes(icon.read_bytes()[:200])  # a truncated download
    with pytest.raises(ValueError, match=r"^image 1: no such file: .*gone\.png$"):
        translator.translate([icon, tmp_path / "gone.png"], "beard")
    with pytest.raises(ValueError, match=r"^image 0: cannot read .*notes\.png \(UnidentifiedImageError: "):
        translator.translate(tmp_path / "notes.png", "beard")
    with pytest.raises(ValueError, match=r"^image 0: cannot read .*cut\.png \(OSError: "):
        translator.translate(str(tmp_path / "cut.png"), "beard")
    with pytest.raises(ValueError, match=r"^image 0: no such file: .*gone\.png$"):
        translator.translate(icon, "beard", reference=tmp_path / "gone.png")
    with pytest.raises(TypeError, match="mixed image kinds"):
        translator.translate([icon, load_rgb(icon)], "beard")


def test_a_pil_image_closed_before_it_was_read_is_one_clear_line(translator, tmp_path):
    """`with Image.open(path) as im: pass` leaves an image Pillow cannot decode any more (it fails
    on a bare assert); loaded inside the block, the same image translates."""
    Image.fromarray(_uint8_images(1, seed=5, h=SIZE, w=SIZE + 8)[0]).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as closed:
        pass
    explicit = Image.open(tmp_path / "a.png")
    explicit.close()
    with Image.open(tmp_path / "a.png") as loaded:
        loaded.load()
    message = r"^image 0: this PIL image's file was closed before its pixels were read; call \.load\(\)"
    for image in (closed, explicit):
        with pytest.raises(ValueError, match=message):
            translator.translate(image, "beard")
        with pytest.raises(ValueError, match=message):
            translator.translate(loaded, "beard", reference=image)
    np.testing.assert_array_equal(np.asarray(translator.translate(loaded, "beard")),
                                  np.asarray(translator.translate(tmp_path / "a.png", "beard")))


def test_targets_and_latents_that_would_give_silent_garbage_are_refused(translator, monkeypatch):
    image = _images(1)
    beard = translator.translate(image, "beard")
    # Finite Python weights that overflow float32, normalised in float64 instead of becoming NaN / 0.
    torch.testing.assert_close(translator.translate(image, {"beard": 1e39}), beard)
    torch.testing.assert_close(translator.translate(image, {"beard": 3e38, "black hair": 3e38}),
                               translator.translate(image, ["beard", "black hair"]))
    torch.testing.assert_close(translator.translate(image, np.array(["beard", "black hair"])),
                               translator.translate(image, ["beard", "black hair"]))
    # Object arrays (what pandas hands out): names are names, numbers are weights, as in a
    # float array; a mix of both is refused.
    torch.testing.assert_close(translator.translate(image, np.array(["beard", "black hair"], dtype=object)),
                               translator.translate(image, ["beard", "black hair"]))
    one_hot = [float(name == "beard") for name in CONFIG.domains]
    torch.testing.assert_close(translator.translate(image, np.array(one_hot, dtype=object)), beard)
    torch.testing.assert_close(translator.domain_weights(np.array([0, 1, 3], dtype=object)),
                               translator.domain_weights(np.array([0.0, 0.25, 0.75])))
    with pytest.raises(TypeError, match="only names or only numbers"):
        translator.translate(image, np.array(["beard", 1], dtype=object))
    for spec in (["beard", "beard"], {"beard": 1, CONFIG.domain_index("beard"): 1}):
        with pytest.raises(ValueError, match="'beard' is given twice") as exc:
            translator.translate(image, spec)
        assert "numpy array" not in str(exc.value)
    with pytest.raises(ValueError, match=r"must be \[N, 3\] \(or \[3\]\) for the 3 domains .*got shape \(2,\)$"):
        translator.translate(image, np.array([1.0, 0.0]))
    # A 0/1 list reads as indices: the error says where 0/1 weights go
    with pytest.raises(ValueError, match="given twice.*pass 0/1 weights as a numpy array or tensor"):
        translator.translate(image, [1] + [0] * (CONFIG.num_domains - 1))
    # Near misses of a name: case and spaces, or several names in one string
    with pytest.raises(KeyError, match=r"unknown domain 'Beard ' \(did you mean 'beard'\?"):
        translator.translate(image, "Beard ")
    with pytest.raises(KeyError, match=r"several domains are a list: \['beard', 'black hair'\]"):
        translator.translate(image, "beard, black hair")
    with pytest.raises(KeyError, match=r"unknown domain 'purple'; known domains"):
        translator.translate(image, "purple")
    for seed in (3.7, "3", True, 2 ** 64, -1):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
            translator.translate(image, "beard", seed=seed)
    torch.testing.assert_close(translator.translate(image, "beard", seed=np.int64(3)),
                               translator.translate(image, "beard", seed=3))
    with pytest.raises(ValueError, match="z holds NaN"):
        translator.translate(image, "beard", z=torch.full((CONFIG.latent_dim,), float("nan")))
    # The trained default model turns z = 3e38 into NaN styles; this tiny one stays finite.
    monkeypatch.setattr(translator, "mapping", lambda z, w: torch.full((len(z), CONFIG.style_dim), float("inf")))
    with pytest.raises(ValueError, match="z is too large"):
        translator.translate(image, "beard", z=torch.full((CONFIG.latent_dim,), 3e38))
    monkeypatch.undo()
    meta = torch.empty(1, 3, SIZE, SIZE, device="meta")
    with pytest.raises(ValueError, match="meta device holds no data"):
        translator.translate(meta, "beard")
    with pytest.raises(ValueError, match="z: a tensor on the meta device"):
        translator.translate(image, "beard", z=torch.empty(CONFIG.latent_dim, device="meta"))
    with pytest.raises(TypeError, match="style must be numbers"):
        translator.translate(image, style=["a", "b"])


def test_a_list_of_tensors_comes_back_in_each_tensors_dtype(translator):
    images = [_images(1)[0].half(), _images(1, seed=1)[0], _images(1, seed=2)[0].bfloat16()]
    outputs = translator.translate(images, "beard")
    assert [o.dtype for o in outputs] == [torch.float16, torch.float32, torch.bfloat16]
    stacked = translator.translate(torch.stack([i.float() for i in images]), "beard")
    for output, expected in zip(outputs, stacked):
        torch.testing.assert_close(output.float(), expected, atol=1e-2, rtol=0)


def test_loading_refuses_arguments_it_would_ignore_or_misread(checkpoint):
    for device, message in (("gpu", "unknown device 'gpu'"), ("meta", "device 'meta' cannot run")):
        with pytest.raises(ValueError, match=message):
            Translator.from_checkpoint(checkpoint, device=device)
    with pytest.raises(ValueError, match="impl, cuda_graphs apply to backend='torch' only"):
        Translator.from_checkpoint(checkpoint, backend="onnxruntime", impl="ref", cuda_graphs=True)
    with pytest.raises(ValueError, match="artifact= names an exported file"):
        Translator.from_checkpoint(checkpoint, artifact=checkpoint / "model.onnx")
    with pytest.raises(ValueError, match="providers= applies to backend='onnxruntime' only"):
        Translator.from_checkpoint(checkpoint, providers=["CPUExecutionProvider"])


def _no_conversion(*args, **kwargs):
    raise ValueError("no conversion")


def test_bad_images_give_clear_errors(translator, tmp_path):
    with pytest.raises(ValueError, match="3 channels"):
        translator.translate(torch.zeros(2, 4, SIZE, SIZE), "beard")
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        translator.translate(np.zeros((SIZE, SIZE, 5), np.uint8), "beard")
    unreadable = Image.new("CMYK", (SIZE, SIZE))
    unreadable.convert = _no_conversion
    with pytest.raises(ValueError, match=r"image 1: cannot read this PIL image \(CMYK\): no conversion"):
        translator.translate([Image.new("RGB", (SIZE, SIZE)), unreadable], "beard")
    Image.fromarray(_uint8_images(1)[0]).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:-200])
    with Image.open(tmp_path / "cut.png") as cut, pytest.raises(ValueError, match="image 0: cannot read"):
        translator.translate(cut, "beard")
    with pytest.raises(ValueError, match=r"\[H, W, 4\] \(RGBA\)"):
        translator.translate(np.zeros((SIZE, SIZE, 2), np.uint8), "beard")
    with pytest.raises(ValueError, match="uint8"):
        translator.translate(np.zeros((SIZE, SIZE, 3), np.float32), "beard")
    with pytest.raises(ValueError, match="empty batch"):
        translator.translate([], "beard")
    with pytest.raises(ValueError, match="empty batch"):
        translator.translate(torch.zeros(0, 3, SIZE, SIZE), "beard")
    with pytest.raises(TypeError, match="mixed image kinds"):
        translator.translate([np.zeros((SIZE, SIZE, 3), np.uint8), torch.zeros(3, SIZE, SIZE)], "beard")
    bad = torch.zeros(1, 3, SIZE, SIZE)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        translator.translate(bad, "beard")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        translator.translate(torch.full((3, SIZE, SIZE), 255.0), "beard")
    with pytest.raises(TypeError, match="unsupported image type bytes"):
        translator.translate(b"\x89PNG", "beard")
    for width, height in [(0, 0), (0, SIZE), (SIZE, 0)]:
        with pytest.raises(ValueError, match=f"image 0: empty PIL image of size {width}x{height}"):
            translator.translate(Image.new("RGB", (width, height)), "beard")
    with pytest.raises(ValueError, match="image 1: empty PIL image"):
        translator.translate([Image.new("RGB", (SIZE, SIZE)), Image.new("RGB", (0, 0))], "beard")
    with pytest.raises(ValueError, match="image 0: empty image"):
        translator.translate(np.zeros((0, SIZE, 3), np.uint8), "beard")


def test_missing_networks_and_options(checkpoint, translator):
    bare = Translator(translator.backend)  # no mapping network / style encoder
    images = _images(1)
    with pytest.raises(CheckpointError, match="mapping network"):
        bare.translate(images, "beard", seed=0)
    with pytest.raises(CheckpointError, match="style encoder"):
        bare.translate(images, "beard", reference=images)
    with pytest.raises(ValueError, match="CUDA"):
        Translator.from_checkpoint(checkpoint, cuda_graphs=True)
    with pytest.raises(ValueError, match="unknown backend"):
        Translator.from_checkpoint(checkpoint, backend="tvm")
    with pytest.raises(ValueError, match="unknown dtype"):
        Translator.from_checkpoint(checkpoint, dtype="int8")
    # Rejected when constructed, not at the first translation.
    with pytest.raises(ValueError, match="unknown impl 'bogus'.*auto.*ref.*triton"):
        Translator.from_checkpoint(checkpoint, impl="bogus")


def test_broken_style_table_is_refused_when_loading(checkpoint, tmp_path):
    """A wrong-shaped or non-finite table fails at from_checkpoint, not inside the first translate."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    source = str(checkpoint / "model.safetensors")
    with safe_open(source, "pt") as f:
        header = f.metadata()
    tensors = load_file(source)
    nan_table = torch.zeros(D, CONFIG.style_dim)
    nan_table[0, 0] = float("nan")
    for table, message in [(torch.zeros(D, CONFIG.style_dim + 2), r"latent style table is \[3, 18\]"),
                           (nan_table, "latent style table holds NaN")]:
        save_file({**tensors, "style_table.latent": table}, str(tmp_path / "model.safetensors"),
                  metadata=header)
        with pytest.raises(CheckpointError, match=message):
            Translator.from_checkpoint(tmp_path)


def test_concurrent_calls_match_serial(translator):
    specs = ["blond hair", "black hair", "beard", ["blond hair", "beard"]]
    jobs = [(_images(1 + i % 3, seed=20 + i), specs[i % 4]) for i in range(12)]
    serial = [translator.translate(images, spec) for images, spec in jobs]
    seeded_serial = translator.translate(jobs[0][0], "beard", seed=3)
    results: dict[int, torch.Tensor] = {}
    seeded: list[torch.Tensor] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker(thread: int) -> None:
        try:
            barrier.wait()
            for index in range(thread, len(jobs), 4):
                images, spec = jobs[index]
                results[index] = translator.translate(images, spec)
                seeded.append(translator.translate(jobs[0][0], "beard", seed=3))
        except BaseException as err:  # surfaced in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(results) == list(range(len(jobs)))
    for index, expected in enumerate(serial):
        torch.testing.assert_close(results[index], expected, atol=1e-6, rtol=0)
    assert len(seeded) == len(jobs)
    for out in seeded:
        torch.testing.assert_close(out, seeded_serial, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- TensorRT sidecar


def _write_engine(folder, sidecar: dict) -> str:
    engine = folder / "model.engine"
    engine.write_bytes(b"not really an engine")
    (folder / "model.engine.json").write_text(json.dumps(sidecar))
    return str(engine)


def test_engine_sidecar_is_validated_before_tensorrt(tmp_path):
    with pytest.raises(ArtifactError, match="no TensorRT engine"):
        Translator.from_engine(tmp_path / "missing.engine")
    foreign = _write_engine(tmp_path, {"name": "some other model"})
    with pytest.raises(ArtifactError, match="not a LANIT artifact"):
        Translator.from_engine(foreign)
    sidecar = {"lanit_config": CONFIG.to_json(), "domains": json.dumps(list(CONFIG.domains)),
               "precision": "fp16", "kind": "domain_weights", "io_dtype": "float32",
               "min_batch": 1, "opt_batch": 8, "max_batch": 64}
    engine = _write_engine(tmp_path, sidecar)
    with pytest.raises(ArtifactError, match="not the expected"):
        Translator.from_engine(engine, domains=["smiling", "beard"])
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"lanit-rt\[tensorrt\]"):
            Translator.from_engine(engine)


# --------------------------------------------------------------------------- onnxruntime


@pytest.fixture(scope="module")
def onnx_path(checkpoint, model):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from lanit_export.onnx_export import export_onnx
    path = checkpoint / "model.onnx"
    export_onnx(model, path, precision="fp32", validate=False)
    return path


@pytest.mark.slow
def test_onnxruntime_matches_torch_backend(checkpoint, onnx_path, translator):
    ort = Translator.from_checkpoint(checkpoint, backend="onnxruntime")
    assert ort.backend.name == "onnxruntime" and ort.backend.supports_style
    images = _images(5, seed=30)
    for spec in ("black hair", ["blond hair", "beard"], torch.rand(5, D) + 0.1):
        torch.testing.assert_close(ort.translate(images, spec), translator.translate(images, spec),
                                   atol=1e-4, rtol=0)
    torch.testing.assert_close(ort.translate(images, "beard", seed=2),
                               translator.translate(images, "beard", seed=2), atol=1e-4, rtol=0)
    refs = _images(5, seed=31)
    torch.testing.assert_close(ort.translate(images, "beard", reference=refs),
                               translator.translate(images, "beard", reference=refs), atol=1e-4, rtol=0)

    standalone = Translator.from_onnx(onnx_path, domains=CONFIG.domains)
    assert standalone.domains == CONFIG.domains
    arrays = _uint8_images(2, seed=32, h=40, w=36)
    _assert_uint8_close(standalone.translate(arrays, "beard", resize_back=True),
                        translator.translate(arrays, "beard", resize_back=True))
    with pytest.raises(CheckpointError, match="mapping network"):
        standalone.translate(arrays, "beard", seed=1)


@pytest.mark.slow
def test_an_export_of_other_weights_is_refused(checkpoint, onnx_path, model, tmp_path):
    """An ONNX file left from before more training has the checkpoint's config but not its weights:
    the weights digest in its metadata tells them apart, for the checkpoint and for the style graph."""
    import shutil

    from lanit_export.onnx_export import export_onnx

    retrained = tmp_path / "retrained"
    retrained.mkdir()
    for name in ("model.onnx", "model.style.onnx"):
        shutil.copy(checkpoint / name, retrained / name)
    generator = load_checkpoint(checkpoint).generator
    with torch.no_grad():
        generator.to_rgb[-1].weight.mul_(0.5)
    save_checkpoint(retrained, CONFIG, generator, model.mapping, model.style_encoder,
                    latent_table=model.latent_table)
    with pytest.raises(ArtifactError, match="exported from other weights than") as exc:
        Translator.from_checkpoint(retrained, backend="onnxruntime")
    assert f"export it again: `lanit-export {retrained} --onnx {retrained / 'model.onnx'}`" in str(exc.value)
    assert Translator.from_checkpoint(checkpoint, backend="onnxruntime").backend.supports_style

    export_onnx(load_checkpoint(retrained), retrained / "model.onnx", precision="fp32", validate=False)
    (retrained / "model.style.onnx").unlink()
    shutil.copy(checkpoint / "model.style.onnx", retrained / "model.style.onnx")  # the old style graph
    with pytest.raises(ArtifactError, match="exported from different models"):
        Translator.from_onnx(retrained / "model.onnx")


def test_onnx_providers_and_domains_are_checked(onnx_path):
    one = Translator.from_onnx(onnx_path, providers="CPUExecutionProvider")  # one name, not its letters
    assert one.backend.providers == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="onnxruntime here has no NoSuchExecutionProvider"):
        Translator.from_onnx(onnx_path, providers=["NoSuchExecutionProvider"])
    with pytest.raises(TypeError, match="not one string"):
        Translator.from_onnx(onnx_path, domains="beard")


@pytest.mark.slow
def test_mismatched_or_foreign_onnx_artifacts(checkpoint, onnx_path, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    with pytest.raises(ArtifactError, match="not the expected"):
        Translator.from_onnx(onnx_path, domains=["smiling", "blond hair", "beard"])
    with pytest.raises(ArtifactError, match=r"fp32 artifact, not the requested fp16; .*--onnx OUT.onnx \[--fp16\]"):
        Translator.from_checkpoint(checkpoint, backend="onnxruntime", dtype="fp16")
    with pytest.raises(ArtifactError, match="lanit-export"):
        Translator.from_checkpoint(checkpoint, backend="onnxruntime", artifact=tmp_path / "none.onnx")

    proto = onnx.load(str(onnx_path))
    other = LanitConfig.from_dict({**CONFIG.to_dict(), "domains": ["smiling", "beard", "bald"]})
    for prop in proto.metadata_props:
        if prop.key == "lanit_config":
            prop.value = other.to_json()
        if prop.key == "domains":
            prop.value = json.dumps(list(other.domains))
    relabelled = tmp_path / "relabelled.onnx"
    onnx.save(proto, str(relabelled))
    with pytest.raises(ArtifactError, match="different model"):
        Translator.from_checkpoint(checkpoint, backend="onnxruntime", artifact=relabelled)

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "foreign",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(foreign))
    with pytest.raises(ArtifactError, match="not a LANIT artifact"):
        Translator.from_onnx(foreign)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"definitely not protobuf")
    with pytest.raises(ArtifactError, match="not a loadable ONNX graph"):
        Translator.from_onnx(garbage)

    style_only = Translator.from_onnx(str(onnx_path).replace(".onnx", ".style.onnx"))
    with pytest.raises(ArtifactError, match="style-input graph"):
        style_only.translate(_images(1), "beard")
    style = torch.randn(1, CONFIG.style_dim)
    assert style_only.translate(_images(1), style=style).shape == (1, 3, SIZE, SIZE)


def test_a_stale_or_other_precision_engine_says_how_to_build_the_one_wanted(checkpoint, model, monkeypatch):
    """backend='tensorrt' against a stand-in for the engine runner (TensorRT runs on neither machine):
    an engine from other weights, or of another precision than dtype=, names the lanit-export command."""
    from lanit_rt.backends import tensorrt as trt_backend

    class Engine:
        def __init__(self, path, device="cuda"):
            self.config, self.precision, self.weights_digest = model.config, "fp16", digest

    monkeypatch.setattr(trt_backend, "TensorRTBackend", Engine)
    engine = checkpoint / "model.engine"
    digest = "0" * 16
    with pytest.raises(ArtifactError, match="other weights") as exc:
        Translator.from_checkpoint(checkpoint, backend="tensorrt")
    assert f"export it again: `lanit-export {checkpoint} --trt fp16 --out {engine}`" in str(exc.value)
    digest = model.weights_digest()
    with pytest.raises(ArtifactError, match="fp16 artifact, not the requested fp32") as exc:
        Translator.from_checkpoint(checkpoint, backend="tensorrt", dtype="fp32")
    assert f"`lanit-export {checkpoint} --trt fp32 --out OUT.engine` builds one" in str(exc.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_clear_line(checkpoint):
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"device '{device}': no CUDA device is available here; use 'cpu'"):
            Translator.from_checkpoint(checkpoint, device=device)
