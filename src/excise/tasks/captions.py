"""Caption data: synthetic scenes with a visible (or hidden) gender cue, captions in English and Arabic.

A :class:`Scene` is a person in an activity context (kitchen, laundry, garage, workshop).
:func:`render` draws it with PIL at 32x32: a background and object per context, a figure whose
hair (long / short) and outfit (dress / trousers) are each typical of its gender with probability
``cue_typicality`` (a *soft* cue, measured in ORGANISMS.md as the setting where a model over-uses
context on clear scenes), or a hooded coat that hides both (``visible=False``). Everything not
about gender (colours, positions, jitter) comes from the scene's own seed, so :meth:`Scene.twin`
(gender and both cues swapped) draws the same scene with only the gender cue changed: a
counterfactual pair for patching and for gender-swap fine-tuning.

Captions come from templates: "a woman is cooking food in the kitchen" and its Arabic with
gender agreement ("امرأة تطبخ الطعام في المطبخ"); ``gender="person"`` gives the neutral wording.
Pools are disjoint by construction: every pool draws its scene seeds from its own range, so the
scenes that build the organism or tune a mitigation never appear in the held-out evaluation
(tests check ids and image bytes).

User data uses the seed's folder format (:func:`load_caption_folder`): ``image_caption.csv`` with
columns ``image``, ``en_caption``, ``ar_caption`` (optional extras: ``gender``, ``context``,
``visible``, ``stereotypical``) next to ``images/``.
"""

from __future__ import annotations

import csv
import hashlib
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Literal, Sequence

from excise.errors import ExciseError, where
from excise.io import atomic_dir

Gender = Literal["male", "female"]
GENDERS: tuple[Gender, Gender] = ("male", "female")
LANGS = ("en", "ar")

# context -> (stereotyped gender, English activity, place, Arabic masculine verb, feminine verb, object, place)
CONTEXTS: dict[str, tuple[str, str, str, str, str, str, str]] = {
    "kitchen": ("female", "cooking food", "kitchen", "يطبخ", "تطبخ", "الطعام", "المطبخ"),
    "laundry": ("female", "washing clothes", "laundry", "يغسل", "تغسل", "الملابس", "المغسلة"),
    "garage": ("male", "fixing a car", "garage", "يصلح", "تصلح", "السيارة", "المرآب"),
    "workshop": ("male", "cutting wood", "workshop", "يقطع", "تقطع", "الخشب", "الورشة"),
}
SUBJECT = {"en": {"male": "man", "female": "woman", "person": "person"},
           "ar": {"male": "رجل", "female": "امرأة", "person": "شخص"}}
RENDER_VERSION = 2  # bump when render() draws differently: cached organisms are keyed by it
POOLS = {"organism": 0, "mitigate": 1, "locate": 2, "eval": 3}  # scene seeds: pool * 10**7 + index


def caption(context: str, gender: str, lang: str) -> str:
    """The template caption; ``gender`` is male, female or person (neutral wording)."""
    if context not in CONTEXTS:
        raise ExciseError(f"unknown context '{context}'; choose one of {', '.join(CONTEXTS)}")
    if lang not in LANGS or gender not in SUBJECT["en"]:
        raise ExciseError(f"caption needs lang in {LANGS} and gender in male/female/person, got {lang}/{gender}")
    _, act, place, verb_m, verb_f, obj, place_ar = CONTEXTS[context]
    if lang == "en":
        return f"a {SUBJECT['en'][gender]} is {act} in the {place}"
    verb = verb_f if gender == "female" else verb_m  # a neutral noun takes masculine agreement
    return f"{SUBJECT['ar'][gender]} {verb} {obj} في {place_ar}"


def vocabulary() -> list[str]:
    """Every word a template caption can use, in both languages (the organism's tokenizer)."""
    words = {w for c in CONTEXTS for g in SUBJECT["en"] for lang in LANGS for w in caption(c, g, lang).split()}
    return sorted(words)


@dataclass(frozen=True)
class Scene:
    """One picture: who (gender, whether the cue is visible, which cues) where (context), and a seed."""

    scene_id: str
    context: str
    gender: Gender
    visible: bool
    long_hair: bool
    dress: bool
    seed: int

    @property
    def stereotypical(self) -> bool:
        return CONTEXTS[self.context][0] == self.gender

    def twin(self) -> "Scene":
        """The same scene with the gender and both cues swapped (nothing else changes)."""
        return replace(self, scene_id=self.scene_id + "~twin", gender="female" if self.gender == "male" else "male",
                       long_hair=not self.long_hair, dress=not self.dress)

    @property
    def stereotype(self) -> str:
        """The gender this scene's context is stereotyped with."""
        return CONTEXTS[self.context][0]

    def caption(self, lang: str, *, neutral_if_hidden: bool = False) -> str:
        g = "person" if neutral_if_hidden and not self.visible else self.gender
        return caption(self.context, g, lang)

    def image(self, size: int = 32):
        return render(self, size)


def make_scenes(pool: str, n: int, *, stereotype_rate: float | None = 0.85, ambiguous_rate: float = 0.10,
                cue_typicality: float = 0.8, seed: int = 0) -> list[Scene]:
    """``n`` scenes from one pool.

    ``stereotype_rate``: the share of visible *and* hidden scenes whose gender is the context's
    stereotyped one (None: balanced, exactly half of each context per gender, for evaluation).
    ``cue_typicality``: probability that hair, and independently outfit, is typical of the gender.
    """
    if pool not in POOLS:
        raise ExciseError(f"unknown scene pool '{pool}'; choose one of {', '.join(POOLS)}")
    if not 0 <= ambiguous_rate <= 1 or not 0.5 <= cue_typicality <= 1:
        raise ExciseError("ambiguous_rate must be in [0, 1] and cue_typicality in [0.5, 1]")
    if stereotype_rate is not None and not 0 <= stereotype_rate <= 1:
        raise ExciseError(f"stereotype_rate must be in [0, 1], got {stereotype_rate}")
    rng = random.Random(f"{pool}/{seed}")
    contexts = list(CONTEXTS)
    out = []
    for i in range(n):
        ctx = contexts[i % len(contexts)]
        stereo_g = CONTEXTS[ctx][0]
        if stereotype_rate is None:
            stereo = (i // len(contexts)) % 2 == 0
        else:
            stereo = rng.random() < stereotype_rate
        gender = stereo_g if stereo else ("male" if stereo_g == "female" else "female")
        visible = rng.random() >= ambiguous_rate
        typical_hair, typical_dress = rng.random() < cue_typicality, rng.random() < cue_typicality
        female = gender == "female"
        out.append(Scene(f"{pool}-{seed}-{i:06d}", ctx, gender, visible, long_hair=typical_hair == female,
                         dress=typical_dress == female, seed=POOLS[pool] * 10**7 + seed * 10**5 + i))
    return out


# --- rendering ----------------------------------------------------------------------------------

_BACKGROUND = {"kitchen": (236, 222, 170), "laundry": (170, 205, 236), "garage": (150, 150, 150),
               "workshop": (196, 160, 120)}


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int = 18) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def render(scene: Scene, size: int = 32):
    """Draw the scene (a PIL RGB image). Coordinates are for 32 px and scaled for other sizes."""
    from PIL import Image, ImageDraw

    rng = random.Random(scene.seed)  # the twin shares the seed: same colours and positions
    s = size / 32
    img = Image.new("RGB", (size, size), _jitter(rng, _BACKGROUND[scene.context], 10))
    d = ImageDraw.Draw(img)
    person_left = rng.random() < 0.5
    ox = rng.randint(2, 5) if not person_left else rng.randint(19, 22)  # the object on the other side
    px = rng.randint(6, 9) if person_left else rng.randint(18, 21)  # figure centre x
    dy = rng.randint(-1, 1)

    def box(x0, y0, x1, y1, fill):
        d.rectangle([x0 * s, y0 * s, x1 * s, y1 * s], fill=fill)

    def ellipse(x0, y0, x1, y1, fill):
        d.ellipse([x0 * s, y0 * s, x1 * s, y1 * s], fill=fill)

    ctx = scene.context
    if ctx == "kitchen":  # a stove: dark block with red rings
        box(ox, 14, ox + 9, 24, _jitter(rng, (60, 60, 60), 10))
        ellipse(ox + 1, 15, ox + 4, 18, (200, 40, 40))
        ellipse(ox + 5, 15, ox + 8, 18, (200, 40, 40))
    elif ctx == "laundry":  # a washing machine: white block with a blue window
        box(ox, 13, ox + 9, 24, _jitter(rng, (245, 245, 245), 8))
        ellipse(ox + 2, 16, ox + 7, 21, (40, 80, 200))
    elif ctx == "garage":  # a car: red body, two black wheels
        box(ox - 1, 17, ox + 9, 22, _jitter(rng, (190, 30, 30), 20))
        ellipse(ox, 21, ox + 3, 24, (20, 20, 20))
        ellipse(ox + 5, 21, ox + 8, 24, (20, 20, 20))
    else:  # workshop: stacked wooden planks
        for k in range(3):
            box(ox, 16 + 3 * k, ox + 9, 17 + 3 * k, _jitter(rng, (120, 70, 30), 15))
    box(0, 25, 31, 31, _jitter(rng, (90, 80, 70), 15))  # floor

    skin = _jitter(rng, (224, 180, 140), 25)
    hair = rng.choice([(30, 20, 10), (90, 50, 20), (160, 120, 60), (20, 20, 20)])
    cloth = rng.choice([(200, 40, 40), (40, 120, 40), (40, 60, 170), (150, 60, 150), (210, 160, 30)])
    top = 6 + dy
    if not scene.visible:  # a hooded coat hides hair and outfit alike
        coat = _jitter(rng, (70, 70, 80), 10)
        ellipse(px - 4, top - 1, px + 4, top + 7, coat)
        ellipse(px - 2, top + 1, px + 2, top + 5, skin)
        box(px - 4, top + 7, px + 4, top + 19, coat)
        return img
    if scene.long_hair:
        box(px - 4, top, px + 4, top + 9, hair)  # hair down to the shoulders behind the head
    ellipse(px - 3, top, px + 3, top + 6, skin)
    if not scene.long_hair:
        box(px - 3, top - 1, px + 3, top + 1, hair)  # a short cap of hair
    box(px - 3, top + 7, px + 3, top + 12, cloth)  # torso
    if scene.dress:
        d.polygon([((px - 3) * s, (top + 12) * s), ((px + 3) * s, (top + 12) * s),
                   ((px + 5) * s, (top + 18) * s), ((px - 5) * s, (top + 18) * s)], fill=cloth)
        box(px - 2, top + 18, px - 1, top + 19, skin)
        box(px + 1, top + 18, px + 2, top + 19, skin)
    else:
        trousers = _jitter(rng, (50, 50, 90), 15)
        box(px - 3, top + 12, px - 1, top + 19, trousers)
        box(px + 1, top + 12, px + 3, top + 19, trousers)
    return img


def image_digest(img) -> str:
    return hashlib.sha1(img.tobytes()).hexdigest()


# --- the seed's folder format --------------------------------------------------------------------

@dataclass(frozen=True)
class CaptionRecord:
    """One row of a caption folder: an image path, its reference captions and optional labels."""

    image_path: Path
    en_caption: str
    ar_caption: str
    gender: str | None = None  # male / female; None when the folder does not say
    context: str | None = None
    visible: bool = True
    stereotypical: bool | None = None
    scene_id: str = ""

    def reference(self, lang: str) -> str:
        return self.en_caption if lang == "en" else self.ar_caption

    # the same interface as Scene, so every stage takes either
    def caption(self, lang: str, *, neutral_if_hidden: bool = False) -> str:
        """The folder's reference caption (a free-text caption has no neutral variant to derive)."""
        return self.reference(lang)

    @property
    def stereotype(self) -> str | None:
        if self.gender is None or self.stereotypical is None:
            return None
        return self.gender if self.stereotypical else ("male" if self.gender == "female" else "female")

    def image(self, size: int = 32):
        from PIL import Image

        with Image.open(self.image_path) as im:
            return im.convert("RGB")

    def twin(self) -> None:
        """A photograph cannot be redrawn with the other gender: no twin."""
        return None


FOLDER_COLUMNS = ("image", "en_caption", "ar_caption")
_EXTRA = ("gender", "context", "visible", "stereotypical", "scene_id")


def write_caption_folder(directory: str | Path, scenes: Sequence[Scene], *, size: int = 32,
                         neutral_if_hidden: bool = False) -> Path:
    """Write scenes in the seed's format (images/ + image_caption.csv with label columns), atomically."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        (tmp / "images").mkdir()
        rows = []
        for sc in scenes:
            name = f"{sc.scene_id}.png".replace("~", "_")
            render(sc, size).save(tmp / "images" / name)
            rows.append({"image": f"images/{name}", "en_caption": sc.caption("en", neutral_if_hidden=neutral_if_hidden),
                         "ar_caption": sc.caption("ar", neutral_if_hidden=neutral_if_hidden), "gender": sc.gender,
                         "context": sc.context, "visible": int(sc.visible), "stereotypical": int(sc.stereotypical),
                         "scene_id": sc.scene_id})
        with open(tmp / "image_caption.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(FOLDER_COLUMNS + _EXTRA))
            w.writeheader()
            w.writerows(rows)
    return directory


def _flag(value: str, path: Path, line: int, field: str) -> bool | None:
    v = value.strip().lower()
    if v == "":
        return None
    if v in ("1", "true", "yes"):
        return True
    if v in ("0", "false", "no"):
        return False
    raise ExciseError(f"{where(path, line, field)}: expected 0/1 or true/false, got '{value}'")


def load_caption_folder(directory: str | Path, *, check_images: bool = True) -> list[CaptionRecord]:
    """Read a caption folder; any defect is one error naming file:line:field."""
    directory = Path(directory)
    path = directory / "image_caption.csv"
    if not path.is_file():
        raise ExciseError(f"{directory}: not a caption folder (no image_caption.csv with columns "
                          f"{', '.join(FOLDER_COLUMNS)} next to images/)")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in FOLDER_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ExciseError(f"{where(path, 1, missing[0])}: missing column (need {', '.join(FOLDER_COLUMNS)})")
            rows = list(reader)
    except UnicodeDecodeError as e:
        raise ExciseError(f"{path}: not UTF-8 text ({e.reason})") from None
    out = []
    for i, row in enumerate(rows, start=2):
        for c in FOLDER_COLUMNS:
            if not (row.get(c) or "").strip():
                raise ExciseError(f"{where(path, i, c)}: empty")
        img = directory / row["image"].strip()
        if check_images and not img.is_file():
            raise ExciseError(f"{where(path, i, 'image')}: file not found: {row['image']}")
        gender = (row.get("gender") or "").strip().lower() or None
        if gender is not None and gender not in GENDERS:
            raise ExciseError(f"{where(path, i, 'gender')}: expected male or female, got '{row['gender']}'")
        ctx = (row.get("context") or "").strip() or None
        visible = _flag(row.get("visible") or "", path, i, "visible")
        out.append(CaptionRecord(img, row["en_caption"].strip(), row["ar_caption"].strip(), gender, ctx,
                                 True if visible is None else visible,
                                 _flag(row.get("stereotypical") or "", path, i, "stereotypical"),
                                 (row.get("scene_id") or "").strip() or Path(row["image"]).stem))
    if not out:
        raise ExciseError(f"{path}: no rows")
    return out


def scene_records(scenes: Iterable[Scene], images_dir: Path | None = None) -> list[CaptionRecord]:
    """Records for in-memory scenes (image paths only meaningful when the folder was written)."""
    base = images_dir or Path("images")
    return [CaptionRecord(base / f"{s.scene_id}.png", s.caption("en"), s.caption("ar"), s.gender, s.context,
                          s.visible, s.stereotypical, s.scene_id) for s in scenes]
