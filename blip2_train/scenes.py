"""Deterministic synthetic scenes with matching captions: the demo's photos and the demo model's data.

Each scene is a plain background with one or more shapes; every attribute of every shape (colour,
shape, size, position) and the background colour appear in each of its captions, in varied
phrasings, so a caption identifies its scene and retrieval on a set of distinct scenes is well posed.
Object colours and background colours are disjoint vocabularies: a caption's colour word says
unambiguously which part of the picture it describes, which keeps captions checkable by a test
(``caption_accuracy`` looks for the object's colour and shape words).

The same ``(seed, index)`` always gives the same scene and the same pixels, on any machine: all
randomness comes from one ``random.Random`` per scene and drawing is plain PIL.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

# Object colours (RGB): all bright (luma >= 105) and backgrounds all dark (luma <= 60), so an object's
# outline is a brightness edge of the same sign whatever the colours; a ViT's linear patch embedding
# can then pick up shapes without first learning every colour pair. Hues far apart for the same reason.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (235, 50, 50),
    "green": (60, 200, 60),
    "blue": (70, 120, 255),
    "yellow": (245, 225, 40),
    "orange": (250, 150, 30),
    "purple": (175, 90, 235),
    "pink": (250, 140, 210),
    "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "gray": (60, 60, 60),
    "brown": (75, 45, 20),
    "navy": (20, 25, 75),
    "olive": (60, 65, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
# Fraction of the image side that the shape's bounding box spans.
SIZES: dict[str, float] = {"small": 0.2, "medium": 0.3, "large": 0.42}
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium", "medium sized", "mid sized"),
    "large": ("large", "big", "huge"),
}
# 3x3 grid of positions: (name, (x, y) centre as a fraction of the side).
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top": (0.5, 0.25),
    "top right": (0.75, 0.25),
    "left": (0.25, 0.5),
    "center": (0.5, 0.5),
    "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom": (0.5, 0.75),
    "bottom right": (0.75, 0.75),
}
# Phrasings of each position ("{}" never needed: each entry is a complete prepositional phrase).
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "at the top left", "in the upper left"),
    "top": ("at the top", "in the top middle", "near the top"),
    "top right": ("in the top right corner", "at the top right", "in the upper right"),
    "left": ("on the left", "at the left side", "in the middle left"),
    "center": ("in the center", "in the middle", "at the center"),
    "right": ("on the right", "at the right side", "in the middle right"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left"),
    "bottom": ("at the bottom", "in the bottom middle", "near the bottom"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right"),
}
# Single-object caption templates. Slots: {size} {colour} {shape} {where} {bg}.
TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} {where} on a {bg} background",
    "a picture of a {size} {colour} {shape} {where} against a {bg} background",
    "a {bg} background with a {size} {colour} {shape} {where}",
    "there is a {size} {colour} {shape} {where} of a {bg} image",
    "{where} of a {bg} picture is a {size} {colour} {shape}",
    "a photo showing a {size} {colour} {shape} {where} on {bg}",
    "{size} {colour} {shape} {where} with a {bg} background",
)
# Words that every caption is built from; the tokenizers make each a single token.
VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        {
            w
            for text in (
                *COLOURS,
                *BACKGROUNDS,
                *SHAPES,
                *(p for ps in SIZE_WORDS.values() for p in ps),
                *(p for ps in POSITION_PHRASES.values() for p in ps),
                *TEMPLATES,
                "and with a an the",
            )
            for w in text.replace("{", " ").replace("}", " ").split()
            if w not in {"size", "colour", "shape", "where", "bg"}
        }
    )
)


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    """One scene: a background and its objects (their positions are distinct)."""

    background: str
    objects: tuple[SceneObject, ...]
    seed: int = 0

    def key(self) -> tuple[object, ...]:
        """The attributes a caption states; two scenes with the same key have the same captions."""
        return (self.background, *sorted((o.colour, o.shape, o.size, o.position) for o in self.objects))


@dataclass
class SceneRecord:
    """A written scene: relative image path, captions and the attributes (for evaluation)."""

    image: str
    captions: list[str]
    background: str
    objects: list[dict[str, str]] = field(default_factory=list)
    # Partial descriptions (what people type into a search box); empty unless asked for.
    queries: list[str] = field(default_factory=list)
    # Captions of scenes that differ from this one in one attribute (hard negatives); empty unless
    # asked for.
    negatives: list[str] = field(default_factory=list)
    # Images of the same dataset whose scene differs from this one in one attribute (look-alikes, for
    # hard-negative batches); empty unless asked for.
    near: list[str] = field(default_factory=list)


def _object_phrase(obj: SceneObject, rng: random.Random) -> tuple[str, str]:
    size = rng.choice(SIZE_WORDS[obj.size])
    where = rng.choice(POSITION_PHRASES[obj.position])
    return f"{size} {obj.colour} {obj.shape}", where


def captions_for(scene: Scene, n: int = 5, seed: int | str | None = None) -> list[str]:
    """``n`` distinct phrasings of the scene (fewer if the templates run out), deterministic in seed."""
    rng = random.Random(f"captions:{scene.seed if seed is None else seed}")
    out: list[str] = []
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        templates = list(TEMPLATES)
        rng.shuffle(templates)
        for template in templates[:n]:
            size = rng.choice(SIZE_WORDS[obj.size])
            where = rng.choice(POSITION_PHRASES[obj.position])
            text = template.format(
                size=size, colour=obj.colour, shape=obj.shape, where=where, bg=scene.background
            )
            out.append(text)
    else:
        # Multi-object scenes: "a X where and a Y where on a BG background", objects in shuffled order.
        seen: set[str] = set()
        for _ in range(4 * n):
            objs = list(scene.objects)
            rng.shuffle(objs)
            parts = []
            for obj in objs:
                what, where = _object_phrase(obj, rng)
                parts.append(f"a {what} {where}")
            lead = rng.choice(("{objs} on a {bg} background", "a {bg} background with {objs}"))
            text = lead.format(objs=" and ".join(parts), bg=scene.background)
            if text not in seen:
                seen.add(text)
                out.append(text)
            if len(out) == n:
                break
    return out


ARTICLES: tuple[str, ...] = ("a ", "the ", "")


def queries_for(scene: Scene, seed: int | None = None) -> list[str]:
    """Partial descriptions of the scene's objects, as search queries are typed ("the red circle").

    Per object: colour + shape and shape alone with every article (so each such string is in the list
    of *every* image it describes, which lets training treat it as a positive of all of them), and one
    phrasing each of size + colour + shape, colour + shape + position, colour + shape + background and
    size + colour + shape + position.
    """
    rng = random.Random(f"queries:{scene.seed if seed is None else seed}")
    out: list[str] = []
    for obj in scene.objects:
        what = f"{obj.colour} {obj.shape}"
        out += [f"{art}{what}" for art in ARTICLES]
        out += [f"{art}{obj.shape}" for art in ARTICLES[:2]]
        size = rng.choice(SIZE_WORDS[obj.size])
        where = rng.choice(POSITION_PHRASES[obj.position])
        out += [
            f"a {size} {what}",
            f"a {what} {where}",
            f"a {what} on a {scene.background} background",
            f"a {size} {what} {where}",
        ]
    return list(dict.fromkeys(out))


# Which attribute each hard negative changes: position twice, because where the object is is what a
# small model learns last (docs/training.md), then one each of the others.
NEGATIVE_CHANGES: tuple[str, ...] = ("position", "position", "shape", "colour", "size", "background")


def _changed(scene: Scene, change: str, rng: random.Random) -> Scene:
    """The scene with one attribute of one object (or the background) set to another value."""
    if change == "background":
        return replace(scene, background=rng.choice([b for b in BACKGROUNDS if b != scene.background]))
    k = rng.randrange(len(scene.objects))
    obj = scene.objects[k]
    taken = {o.position for o in scene.objects}
    choices = {
        "position": [p for p in POSITIONS if p not in taken],
        "shape": [s for s in SHAPES if s != obj.shape],
        "colour": [c for c in COLOURS if c != obj.colour],
        "size": [z for z in SIZES if z != obj.size],
    }[change]
    new = replace(obj, **{change: rng.choice(choices)})
    return replace(scene, objects=(*scene.objects[:k], new, *scene.objects[k + 1 :]))


def negatives_for(scene: Scene, seed: int | None = None) -> list[str]:
    """Hard-negative captions: for each of ``NEGATIVE_CHANGES``, a caption of the scene with that one
    attribute changed ("... in the top left ..." of a scene whose object is at the top right). Such a
    text matches no image that its own scene's captions match, and differs from them in one phrase,
    so contrastive training can no longer rank captions while ignoring that attribute (NegCLIP,
    Yuksekgonul et al., 2023)."""
    rng = random.Random(f"negatives:{scene.seed if seed is None else seed}")
    out = []
    for i, change in enumerate(NEGATIVE_CHANGES):
        other = _changed(scene, change, rng)
        out.append(captions_for(other, 1, seed=f"{scene.seed}:{i}")[0])
    return list(dict.fromkeys(out))


ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position", "background")


def check_attributes(attributes: Sequence[str]) -> tuple[str, ...]:
    """``attributes`` as a tuple, or a one-line ValueError when it is empty or names an unknown one."""
    unknown = sorted(set(attributes) - set(ATTRIBUTES))
    if unknown or not attributes:
        what = f"unknown scene attributes {unknown}" if unknown else "no scene attributes"
        raise ValueError(f"{what}; use some of {', '.join(ATTRIBUTES)}")
    return tuple(attributes)


def _one_change_keys(scene: Scene, attributes: Sequence[str] = ATTRIBUTES) -> Iterator[tuple[object, ...]]:
    """The keys of every scene that differs from ``scene`` in exactly one of ``attributes``."""
    if "background" in attributes:
        for background in BACKGROUNDS:
            if background != scene.background:
                yield replace(scene, background=background).key()
    taken = {o.position for o in scene.objects}
    for k, obj in enumerate(scene.objects):
        values = {
            "colour": list(COLOURS),
            "shape": list(SHAPES),
            "size": list(SIZES),
            "position": [p for p in POSITIONS if p not in taken],
        }
        for attr, options in values.items():
            if attr not in attributes:
                continue
            for value in options:
                if value != getattr(obj, attr):
                    new = replace(obj, **{attr: value})
                    yield replace(scene, objects=(*scene.objects[:k], new, *scene.objects[k + 1 :])).key()


def look_alikes(scenes: Sequence[Scene], attributes: Sequence[str] = ATTRIBUTES) -> list[list[int]]:
    """For each scene, the indices of the other scenes in ``scenes`` that differ from it in exactly one
    of ``attributes`` (``("position",)``: the same scene elsewhere in the picture)."""
    attributes = check_attributes(attributes)
    by_key: dict[tuple[object, ...], list[int]] = {}
    for i, scene in enumerate(scenes):
        by_key.setdefault(scene.key(), []).append(i)
    return [
        sorted({j for key in _one_change_keys(scene, attributes) for j in by_key.get(key, ())})
        for scene in scenes
    ]


def sample_scene(seed: int, index: int, max_objects: int = 1) -> Scene:
    """The scene number ``index`` of the stream ``seed``."""
    rng = random.Random(f"scene:{seed}:{index}")
    count = rng.randint(1, max_objects)
    positions = rng.sample(list(POSITIONS), count)
    objects = tuple(
        SceneObject(
            colour=rng.choice(list(COLOURS)),
            shape=rng.choice(SHAPES),
            # Several large objects would overlap; multi-object scenes use small and medium only.
            size=rng.choice(list(SIZES) if count == 1 else ["small", "medium"]),
            position=pos,
        )
        for pos in positions
    )
    return Scene(background=rng.choice(list(BACKGROUNDS)), objects=objects, seed=seed * 1_000_003 + index)


def iter_scenes(seed: int, n: int, max_objects: int = 1, unique: bool = True) -> Iterator[Scene]:
    """``n`` scenes; with ``unique`` no two share a caption key (so every caption has one right image).

    Uniqueness is only enforced while it is possible: past the number of distinct keys, repeats are let
    through rather than looping forever.
    """
    seen: set[tuple[object, ...]] = set()
    index = 0
    tries = 0
    produced = 0
    while produced < n:
        scene = sample_scene(seed, index, max_objects)
        index += 1
        key = scene.key()
        if unique and key in seen and tries < 50:
            tries += 1
            continue
        tries = 0
        seen.add(key)
        produced += 1
        yield scene


# ---------------------------------------------------------------------------------------------- drawing
def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of circumradius r around (cx, cy), rotated by angle (radians)."""
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
        pts = [(x * math.sqrt(2) * 0.8, y * math.sqrt(2) * 0.8) for x, y in pts]
    elif shape == "diamond":
        pts = [(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
        pts = [(x, y + 0.15) for x, y in pts]
    elif shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = 1.0 if k % 2 == 0 else 0.42
            pts.append((rr * math.cos(a), rr * math.sin(a)))
    elif shape == "cross":
        t = 0.33
        pts = [
            (-t, -1),
            (t, -1),
            (t, -t),
            (1, -t),
            (1, t),
            (t, t),
            (t, 1),
            (-t, 1),
            (-t, t),
            (-1, t),
            (-1, -t),
            (-t, -t),
        ]
    else:
        raise ValueError(f"not a polygon shape: {shape}")
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    r, g, b = (max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)
    return r, g, b


def render(scene: Scene, size: int = 128, jitter: float = 0.25) -> Image.Image:
    """Draw the scene as an RGB image of ``size`` x ``size`` pixels.

    Drawn at 4x and downsampled (antialiasing). Random jitter in position, size, rotation and colour
    keeps two scenes with the same caption from being the same picture; ``jitter`` scales the
    geometric part (1.0: up to 4% of the side off the grid point, 10% in size, 0.15 rad). The default
    is small because a ViT trained from scratch for minutes on a CPU learns shapes only when a shape
    looks alike across images (no convolutional prior gives it translation invariance for free).
    """
    rng = random.Random(f"render:{scene.seed}")
    big = size * 4
    bg = _jitter(BACKGROUNDS[scene.background], rng, 12)
    image = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(image)
    # A faint second tone in one half of the background: pictures are rarely perfectly flat.
    tone = _jitter(bg, rng, 10)
    if rng.random() < 0.5:
        draw.rectangle([0, rng.randint(0, big), big, big], fill=tone)
    for obj in scene.objects:
        fx, fy = POSITIONS[obj.position]
        cx = (fx + jitter * rng.uniform(-0.04, 0.04)) * big
        cy = (fy + jitter * rng.uniform(-0.04, 0.04)) * big
        r = SIZES[obj.size] * (1 + jitter * rng.uniform(-0.1, 0.1)) * big / 2
        colour = _jitter(COLOURS[obj.colour], rng, 15)
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            angle = jitter * rng.uniform(-0.15, 0.15)
            draw.polygon(_polygon(obj.shape, cx, cy, r, angle), fill=colour)
    return image.resize((size, size), Image.Resampling.LANCZOS).filter(ImageFilter.SMOOTH)


# ---------------------------------------------------------------------------------------------- datasets
def generate_dataset(
    folder: str | Path,
    n: int,
    seed: int = 0,
    *,
    image_size: int = 128,
    max_objects: int = 1,
    captions_per_image: int = 5,
    unique: bool = True,
    split: str = "test",
    image_format: str = "png",
    jitter: float = 0.25,
    queries: bool = False,
    negatives: bool = False,
    near_attributes: Sequence[str] = ATTRIBUTES,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[SceneRecord]:
    """Write ``n`` scenes to ``folder``: ``images/*.png``, ``captions.jsonl`` and ``karpathy.json``.

    ``captions.jsonl`` has one ``{"image", "captions", "background", "objects"}`` per line (paths
    relative to ``folder``); ``karpathy.json`` is the Karpathy split layout (``images[*].filepath``,
    ``filename``, ``split``, ``sentences[*].raw``) with every image in ``split``. Both are read by
    ``blip2_train.data.load_captions``, and the image folder is what the demo indexes. With
    ``queries`` each ``captions.jsonl`` line also has ``"queries"`` (``queries_for``): partial
    descriptions that retrieval training mixes into its texts (never into caption training); with
    ``negatives``, ``"negatives"`` (``negatives_for``: captions with one attribute changed) and
    ``"near"`` (``look_alikes``: the images of this dataset whose scene differs in one of
    ``near_attributes``).
    ``progress("scenes", done, n)`` hears about every scene written.
    """
    if negatives:
        check_attributes(near_attributes)  # before rendering, not after n images
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records: list[SceneRecord] = []
    scenes = list(iter_scenes(seed, n, max_objects=max_objects, unique=unique))
    for i, scene in enumerate(scenes):
        rel = f"images/scene_{seed}_{i:06d}.{image_format}"
        render(scene, image_size, jitter).save(folder / rel)
        records.append(
            SceneRecord(
                image=rel,
                captions=captions_for(scene, captions_per_image),
                background=scene.background,
                objects=[asdict(o) for o in scene.objects],
                queries=queries_for(scene) if queries else [],
                negatives=negatives_for(scene) if negatives else [],
            )
        )
        if progress is not None:
            progress("scenes", i + 1, n)
    if negatives:
        for rec, near in zip(records, look_alikes(scenes, near_attributes), strict=True):
            rec.near = [records[j].image for j in near]
    with open(folder / "captions.jsonl", "w") as fh:
        for rec in records:
            row = asdict(rec)
            for key in ("queries", "negatives", "near"):
                if not row[key]:
                    del row[key]  # the layout of datasets made without them stays as it was
            fh.write(json.dumps(row) + "\n")
    karpathy = {
        "dataset": f"blip2-scenes-seed{seed}",
        "images": [
            {
                "filepath": str(Path(rec.image).parent),
                "filename": Path(rec.image).name,
                "imgid": i,
                "split": split,
                "sentences": [{"raw": c, "tokens": c.split(), "imgid": i} for c in rec.captions],
            }
            for i, rec in enumerate(records)
        ],
    }
    (folder / "karpathy.json").write_text(json.dumps(karpathy))
    return records


def read_records(folder: str | Path) -> list[SceneRecord]:
    """The records a ``generate_dataset`` call wrote."""
    lines = (Path(folder) / "captions.jsonl").read_text().splitlines()
    return [SceneRecord(**json.loads(line)) for line in lines if line.strip()]


def colour_and_shape_named(caption: str, objects: Sequence[dict[str, str]]) -> bool:
    """Whether a caption names the colour and the shape of every object, each next to its colour."""
    words = caption.lower().replace(",", " ").split()
    pairs = set(itertools.pairwise(words))
    return all((o["colour"], o["shape"]) in pairs for o in objects)
