"""The toy world: a procedural renderer of 64x64 scenes with captions, deterministic from a seed.

An image is described by an :class:`ImageSpec` (object class, color, surface pattern, scene,
accessory, size, position, and optionally a *subject*); :func:`render` draws it and
:func:`caption` writes its caption in DreamBench's phrasing ("a red star on the beach",
"a star wearing a santa hat"). A :class:`Subject` is one specific object instance whose look
words cannot describe: its own silhouette (a smooth warp of its class shape) and bold multi-color
markings. It can be rendered in any scene, with any accessory, recolored or resized.

Everything is drawn at 2x resolution and box-filtered down, so edges are anti-aliased. Identity
cues are bold (several pixels wide at 64 px) so that the toy VAE can represent them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

SIZE = 64
_SS = 2  # supersampling factor
_N = SIZE * _SS

CLASSES = ("star", "ball", "box", "heart", "moon", "cone", "ring", "kite")
COLORS = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 215, 40), "green": (45, 160, 60),
    "blue": (40, 80, 220), "purple": (140, 60, 190), "pink": (250, 135, 195), "white": (245, 245, 245),
    "black": (35, 35, 35), "brown": (125, 75, 35),
}
# Extra colors only subjects' markings use (they have no word in captions).
MARKING_COLORS = {**COLORS, "cyan": (40, 210, 220), "lime": (170, 235, 40), "navy": (20, 30, 110),
                  "teal": (20, 130, 120), "magenta": (220, 30, 160), "gold": (200, 160, 20)}
PATTERNS = ("plain", "striped", "spotted", "two-tone")
SCENES = {  # scene name -> the words a caption uses
    "snow": "in the snow", "beach": "on the beach", "jungle": "in the jungle",
    "wooden floor": "on a wooden floor", "pink fabric": "on pink fabric", "night": "at night",
    "city": "in the city", "grass": "on grass with flowers", "desert": "in the desert",
}
ACCESSORIES = {  # accessory name -> the words after "wearing"
    "red hat": "a red hat", "santa hat": "a santa hat", "top hat": "a black top hat",
    "rainbow scarf": "a rainbow scarf", "pink glasses": "pink glasses",
}
SIZES = {"small": (0.17, 0.21), "normal": (0.25, 0.31), "big": (0.36, 0.40)}  # object radius / image side


def _grid() -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(_N) + 0.5) / _N
    return np.meshgrid(c, c, indexing="xy")  # x, y in [0, 1], y down


_X, _Y = _grid()


# -- subjects ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Marking:
    kind: str  # "band", "spot", "half", "core"
    color: str
    params: tuple[float, ...]


@dataclass(frozen=True)
class Subject:
    """One specific object instance: class, default color, its own silhouette and markings."""
    name: str
    cls: str
    color: str
    warp: tuple[tuple[float, float, float], ...]  # (harmonic k, amplitude, phase)
    aspect: float
    rotation: float
    markings: tuple[Marking, ...]

    @classmethod
    def sample(cls, rng: np.random.Generator, name: str = "subject") -> "Subject":
        obj_cls = str(rng.choice(CLASSES))
        color = str(rng.choice(list(COLORS)))
        warp = tuple((float(k), float(rng.uniform(0.06, 0.14)), float(rng.uniform(0, 2 * np.pi)))
                     for k in rng.choice([2, 3, 4], size=2, replace=False))
        others = [c for c in MARKING_COLORS if c != color]
        colors = rng.choice(others, size=2, replace=False)
        kinds = rng.choice(["band", "spot", "half", "core"], size=2, replace=False)
        markings = []
        for kind, mcolor in zip(kinds, colors):
            if kind == "band":  # a bold stripe: angle, offset, width
                params = (rng.uniform(0, np.pi), rng.uniform(-0.35, 0.35), rng.uniform(0.28, 0.4))
            elif kind == "spot":  # a round spot: center, radius
                params = (rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4), rng.uniform(0.3, 0.42))
            elif kind == "half":  # one side of a line: angle, offset
                params = (rng.uniform(0, 2 * np.pi), rng.uniform(0.25, 0.45))
            else:  # a smaller copy of the silhouette: scale, dx, dy
                params = (rng.uniform(0.4, 0.55), rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15))
            markings.append(Marking(str(kind), str(mcolor), tuple(float(p) for p in params)))
        return cls(name, obj_cls, color, warp, float(rng.uniform(0.85, 1.15)),
                   float(rng.uniform(-0.3, 0.3)), tuple(markings))


def training_subject(index: int) -> Subject:
    """Subject ``index`` of the unlimited supply that models and judges may train on."""
    return Subject.sample(np.random.default_rng([1, index]), name=f"train-{index:06d}")


HELDOUT_NAMES = ("zorbo", "plimm", "quaxel", "dribbet", "vonku", "snerf", "kalloo", "brisko",
                 "tumwi", "gorpel", "fenwix", "yablo")


def heldout_subjects() -> list[Subject]:
    """The fixed held-out subjects: no model or judge is ever trained on them."""
    return [Subject.sample(np.random.default_rng([2, i]), name=name) for i, name in enumerate(HELDOUT_NAMES)]


def validation_subject(name: str) -> Subject:
    """Validation subject ``val-N``: like the held-out ones, never trained on by any model or judge, but
    meant for choosing settings (guidance scales, steps) so that the held-out subjects only measure."""
    index = name.removeprefix("val-")
    if not name.startswith("val-") or not index.isdigit():
        raise ValueError(f"validation subjects are named val-0, val-1, ...; got {name!r}")
    return Subject.sample(np.random.default_rng([3, int(index)]), name=name)


def is_validation_name(name: str) -> bool:
    return name.startswith("val-") and name.removeprefix("val-").isdigit()


# -- image specs and captions ---------------------------------------------------------------------

@dataclass(frozen=True)
class ImageSpec:
    cls: str
    color: str
    pattern: str = "plain"
    scene: Optional[str] = None  # None: a plain light background
    accessory: Optional[str] = None
    size: str = "normal"
    x: float = 0.5  # object center, fraction of the image
    y: float = 0.55
    radius: float = 0.28
    seed: int = 0  # background details and pattern phase
    subject: Optional[Subject] = field(default=None, compare=False)

    def replace(self, **changes) -> "ImageSpec":
        return dataclasses.replace(self, **changes)


def sample_spec(rng: np.random.Generator, subject: Optional[Subject] = None, *, scene: Optional[str] = "random",
                accessory: Optional[str] = "random", color: Optional[str] = None, size: Optional[str] = None,
                p_accessory: float = 0.3, p_no_scene: float = 0.1) -> ImageSpec:
    """A random image spec; a subject keeps its class (and its color unless ``color`` is given)."""
    if scene == "random":
        scene = None if rng.random() < p_no_scene else str(rng.choice(list(SCENES)))
    if accessory == "random":
        accessory = str(rng.choice(list(ACCESSORIES))) if rng.random() < p_accessory else None
    size = size or str(rng.choice(list(SIZES), p=[0.2, 0.6, 0.2]))
    radius = float(rng.uniform(*SIZES[size]))
    margin = radius + 0.04
    top = margin + (0.12 if accessory in ("red hat", "santa hat", "top hat") else 0.0)
    x = float(rng.uniform(margin, 1 - margin)) if margin < 0.5 else 0.5
    y = float(rng.uniform(min(top, 0.5), max(1 - margin, 0.5)))
    if subject is not None:
        return ImageSpec(subject.cls, color or subject.color, "plain", scene, accessory, size, x, y, radius,
                         int(rng.integers(2**31)), subject)
    return ImageSpec(str(rng.choice(CLASSES)), color or str(rng.choice(list(COLORS))),
                     str(rng.choice(PATTERNS, p=[0.55, 0.15, 0.15, 0.15])), scene, accessory, size, x, y, radius,
                     int(rng.integers(2**31)))


def caption(spec: ImageSpec, token: Optional[str] = None) -> str:
    """DreamBench-style caption; ``token`` (e.g. "sks") names the subject: "a sks star in the snow"."""
    words = ["a"]
    if spec.size != "normal":
        words.append(spec.size)
    if spec.subject is None or spec.color != spec.subject.color:
        words.append(spec.color)
    if spec.subject is None and spec.pattern != "plain":
        words.append(spec.pattern)
    if token:
        words.append(token)
    words.append(spec.cls)
    if spec.accessory:
        words += ["wearing", ACCESSORIES[spec.accessory]]
    if spec.scene:
        words.append(SCENES[spec.scene])
    text = " ".join(words)
    return text.replace("a orange", "an orange")


# -- drawing --------------------------------------------------------------------------------------

def _shape_mask(cls: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test of a class shape in object coordinates (radius ~1, v down)."""
    r = np.hypot(u, v)
    if cls == "ball":
        return r <= 1.0
    if cls == "box":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if cls == "kite":
        return np.abs(u) / 0.75 + np.abs(v) <= 1.0
    if cls == "ring":
        return (r <= 1.0) & (r >= 0.5)
    if cls == "moon":
        return (r <= 1.0) & (np.hypot(u - 0.55, v + 0.1) >= 0.8)
    if cls == "cone":
        return (v <= 0.85) & (v >= -0.95) & (np.abs(u) <= (v + 0.95) * 0.5)
    if cls == "heart":
        w, t = u / 1.05, -(v - 0.1) / 1.05
        return (w**2 + t**2 - 0.6) ** 3 - w**2 * t**3 * 1.2 <= 0
    if cls == "star":
        theta = np.arctan2(u, -v)
        spike = np.abs(((theta / (2 * np.pi / 5)) % 1.0) - 0.5) * 2  # 1 at a point, 0 between
        return r <= 0.45 + 0.6 * spike**1.6
    raise ValueError(f"unknown class {cls!r}")


def _object_coords(spec: ImageSpec) -> tuple[np.ndarray, np.ndarray]:
    u, v = (_X - spec.x) / spec.radius, (_Y - spec.y) / spec.radius
    subject = spec.subject
    if subject is None:
        return u, v
    cos, sin = np.cos(subject.rotation), np.sin(subject.rotation)
    u, v = (cos * u + sin * v) / subject.aspect, (-sin * u + cos * v) * subject.aspect
    theta = np.arctan2(v, u)
    stretch = 1.0 + sum(a * np.sin(k * theta + p) for k, a, p in subject.warp)
    return u / stretch, v / stretch


def _paint(img: np.ndarray, mask: np.ndarray, color) -> None:
    img[mask] = np.asarray(color, dtype=np.float32)


def _background(scene: Optional[str], rng: np.random.Generator) -> np.ndarray:
    img = np.empty((_N, _N, 3), np.float32)
    x, y = _X, _Y
    if scene is None:
        img[:] = (232, 230, 225)
    elif scene == "snow":
        horizon = rng.uniform(0.35, 0.5)
        img[:] = (190, 205, 225)
        _paint(img, y > horizon + 0.03 * np.sin(x * 9 + rng.uniform(0, 6)), (250, 252, 255))
        for _ in range(12):
            cx, cy = rng.uniform(0, 1, 2)
            _paint(img, np.hypot(x - cx, y - cy) < 0.022, (255, 255, 255))
    elif scene == "beach":
        sea, sand = rng.uniform(0.3, 0.4), rng.uniform(0.5, 0.6)
        img[:] = (120, 190, 245)
        _paint(img, y > sea, (20, 90, 170))
        _paint(img, y > sand + 0.03 * np.sin(x * 7 + rng.uniform(0, 6)), (235, 210, 150))
    elif scene == "jungle":
        img[:] = (20, 70, 25)
        for _ in range(14):
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.06, 0.12)
            _paint(img, ((x - cx) / 2) ** 2 + (y - cy) ** 2 < (r / 2) ** 2 * 1.0, (60, 140, 40))
        _paint(img, np.abs(np.sin((x + rng.uniform(0, 1)) * 9)) < 0.12, (10, 45, 15))
    elif scene == "wooden floor":
        img[:] = (170, 115, 65)
        plank = (y * 8 + rng.uniform(0, 1)) % 1.0
        _paint(img, plank < 0.12, (105, 65, 30))
        _paint(img, (plank > 0.5) & (plank < 0.56), (150, 98, 52))
    elif scene == "pink fabric":
        fold = np.sin((x * 0.6 + y) * 14 + rng.uniform(0, 6))
        img[:] = np.array([235, 150, 190], np.float32) + (fold[..., None] * np.array([15, 20, 18], np.float32))
    elif scene == "night":
        img[:] = (15, 20, 55)
        for _ in range(14):
            cx, cy = rng.uniform(0, 1, 2)
            _paint(img, np.hypot(x - cx, y - cy) < 0.02, (250, 250, 200))
    elif scene == "city":
        img[:] = (175, 185, 200)
        left = 0.0
        while left < 1.0:
            width, top = rng.uniform(0.12, 0.25), rng.uniform(0.15, 0.5)
            shade = rng.uniform(70, 120)
            box = (x >= left) & (x < left + width - 0.01) & (y > top)
            _paint(img, box, (shade, shade, shade + 10))
            windows = box & (((x - left) * 16) % 1 > 0.5) & ((y * 12) % 1 < 0.45)
            _paint(img, windows, (240, 220, 120))
            left += width
    elif scene == "grass":
        img[:] = (80, 175, 60)
        for _ in range(16):
            cx, cy = rng.uniform(0, 1), rng.uniform(0.2, 1)
            petal = tuple(rng.choice([(250, 250, 250), (250, 220, 40), (230, 60, 120)]))
            _paint(img, np.hypot(x - cx, y - cy) < 0.022, petal)
    elif scene == "desert":
        img[:] = (250, 200, 120)
        dune = 0.45 + 0.06 * np.sin(x * 6 + rng.uniform(0, 6))
        _paint(img, y > dune, (225, 160, 80))
        _paint(img, y > dune + 0.2 + 0.04 * np.sin(x * 11 + rng.uniform(0, 6)), (205, 140, 65))
    else:
        raise ValueError(f"unknown scene {scene!r}; choose from {', '.join(SCENES)}")
    return img


def _pattern(spec: ImageSpec, u: np.ndarray, v: np.ndarray, inside: np.ndarray, img: np.ndarray,
             rng: np.random.Generator) -> None:
    base = np.array(COLORS[spec.color], np.float32)
    if spec.subject is not None:
        for marking in spec.subject.markings:
            if marking.kind == "band":
                angle, offset, width = marking.params
                region = np.abs(u * np.cos(angle) + v * np.sin(angle) - offset) < width / 2
            elif marking.kind == "spot":
                cx, cy, r = marking.params
                region = np.hypot(u - cx, v - cy) < r
            elif marking.kind == "half":
                angle, offset = marking.params
                region = u * np.cos(angle) + v * np.sin(angle) > offset
            else:
                scale, dx, dy = marking.params
                region = _shape_mask(spec.cls, (u - dx) / scale, (v - dy) / scale)
            _paint(img, inside & region, MARKING_COLORS[marking.color])
        return
    if spec.pattern == "plain":
        return
    other = np.where(base.mean() > 128, base * 0.45, np.minimum(base + 110, 255)).astype(np.float32)
    phase = rng.uniform(0, 1)
    if spec.pattern == "striped":
        region = ((v * 2.2 + phase) % 1.0) < 0.45
    elif spec.pattern == "spotted":
        region = np.hypot(((u * 1.6 + phase) % 1.0) - 0.5, ((v * 1.6 + phase) % 1.0) - 0.5) < 0.24
    else:  # two-tone: left and right halves
        region = u > 0
    _paint(img, inside & region, other)


def _accessory(spec: ImageSpec, mask: np.ndarray, img: np.ndarray) -> None:
    rows = np.nonzero(mask.any(axis=1))[0]
    if len(rows) == 0:
        return
    top = rows[0] / _N
    cols = np.nonzero(mask[rows[0]: rows[0] + max(2, _N // 32)].any(axis=0))[0]
    cx = (cols.mean() + 0.5) / _N
    r = spec.radius
    x, y = _X, _Y
    if spec.accessory == "red hat":  # a rounded cap with a brim
        _paint(img, (np.hypot((x - cx) / 0.8, y - top) < r * 0.5) & (y <= top + 0.01), (210, 25, 30))
        _paint(img, (np.abs(x - cx) < r * 0.65) & (np.abs(y - top) < r * 0.08), (150, 10, 15))
    elif spec.accessory == "santa hat":  # red cone, white trim and pompom
        h = r * 0.9
        cone = (y < top) & (y > top - h) & (np.abs(x - cx) < (y - (top - h)) / h * r * 0.55)
        _paint(img, cone, (215, 20, 25))
        _paint(img, (np.abs(x - cx) < r * 0.62) & (np.abs(y - top) < r * 0.12), (250, 250, 250))
        _paint(img, np.hypot(x - cx, y - (top - h)) < r * 0.16, (250, 250, 250))
    elif spec.accessory == "top hat":  # black cylinder with a brim and a band
        h = r * 0.85
        _paint(img, (np.abs(x - cx) < r * 0.38) & (y < top) & (y > top - h), (20, 20, 20))
        _paint(img, (np.abs(x - cx) < r * 0.65) & (np.abs(y - top) < r * 0.09), (20, 20, 20))
        _paint(img, (np.abs(x - cx) < r * 0.38) & (np.abs(y - (top - r * 0.2)) < r * 0.07), (150, 30, 40))
    elif spec.accessory == "rainbow scarf":  # horizontal bands across the lower middle of the object
        ys = spec.y + r * 0.2
        band = (np.abs(y - ys) < r * 0.27) & (np.abs(x - spec.x) < r * 1.05)
        rainbow = [(230, 30, 30), (250, 150, 20), (245, 230, 40), (40, 170, 60), (40, 90, 230), (130, 50, 190)]
        stripe = np.clip(((y - (ys - r * 0.27)) / (r * 0.54) * 6).astype(int), 0, 5)
        for i, color in enumerate(rainbow):
            _paint(img, band & (stripe == i), color)
        _paint(img, (np.abs(x - (spec.x + r * 0.45)) < r * 0.16) & (y > ys) & (y < ys + r * 0.8), (230, 30, 30))
    elif spec.accessory == "pink glasses":
        gy = spec.y - r * 0.2
        for side in (-1, 1):
            lens = np.hypot(x - (spec.x + side * r * 0.38), y - gy)
            _paint(img, (lens < r * 0.3), (255, 105, 180))
            _paint(img, (lens < r * 0.18), (60, 20, 50))
        _paint(img, (np.abs(x - spec.x) < r * 0.12) & (np.abs(y - gy) < r * 0.05), (255, 105, 180))
    else:
        raise ValueError(f"unknown accessory {spec.accessory!r}; choose from {', '.join(ACCESSORIES)}")


def render(spec: ImageSpec) -> np.ndarray:
    """Draw ``spec``: a (64, 64, 3) uint8 RGB array, the same for the same spec."""
    if spec.cls not in CLASSES:
        raise ValueError(f"unknown class {spec.cls!r}; choose from {', '.join(CLASSES)}")
    if spec.color not in COLORS:
        raise ValueError(f"unknown color {spec.color!r}; choose from {', '.join(COLORS)}")
    rng = np.random.default_rng(spec.seed)
    img = _background(spec.scene, rng)
    u, v = _object_coords(spec)
    mask = _shape_mask(spec.cls, u, v)
    outline = _shape_mask(spec.cls, u / 1.09, v / 1.09) & ~mask
    _paint(img, outline, (25, 25, 25))
    _paint(img, mask, COLORS[spec.color])
    _pattern(spec, u, v, mask, img, rng)
    if spec.accessory:
        _accessory(spec, mask, img)
    small = img.reshape(SIZE, _SS, SIZE, _SS, 3).mean(axis=(1, 3))
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def render_many(specs: list[ImageSpec]) -> np.ndarray:
    return np.stack([render(s) for s in specs])
