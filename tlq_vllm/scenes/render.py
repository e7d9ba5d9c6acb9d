"""Scene sampling and drawing: several coloured shapes on a 3x3 grid, drawn with numpy masks.

A scene is 2-5 objects, at most one per cell of a 3x3 grid, each with a shape (5), a colour (8)
and a size class (small / large); no two objects share all three attributes, so every object
has a unique description without its position. Positions jitter inside the cell and the
background is one of three light tones: nuisances the model must see through.

Drawing is exact arithmetic: centres, half-extents and pixel centres are multiples of 1/4, so
every mask comparison is exact in float64 and the pixels are the same on every machine and
numpy/Pillow version (no fonts, no anti-aliasing, no Pillow drawing code). The canvas is
280x280 pixels: 20x20 patches of 14 pixels, which Qwen2-VL's 2x2 merger turns into 100 vision
tokens at native resolution (64 through a processor capped at 224x224 pixels, like the fixtures').
Objects never touch (a 4-pixel margin inside each cell), so they are separate connected regions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from tlq_vllm.scenes.splits import BUCKET_RANGES, layout_bucket, stream_seed

CANVAS = 280
GRID = 3
CELL = CANVAS / GRID
MARGIN = 4.0
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {
    "red": (215, 38, 38),
    "green": (34, 160, 60),
    "blue": (40, 90, 215),
    "yellow": (240, 200, 30),
    "purple": (135, 60, 185),
    "orange": (245, 135, 25),
    "pink": (240, 120, 185),
    "brown": (125, 80, 40),
}
BACKGROUNDS = ((255, 255, 255), (232, 232, 232), (245, 238, 220))
SIZES = {"small": (12.0, 15.0), "large": (26.0, 31.0)}  # half-extent range in pixels
POSITIONS = (("top left", "top middle", "top right"),
             ("middle left", "center", "middle right"),
             ("bottom left", "bottom middle", "bottom right"))
MIN_OBJECTS, MAX_OBJECTS = 2, 5


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    row: int
    col: int
    cx: float  # centre and half-extent in pixels, multiples of 1/4
    cy: float
    radius: float

    @property
    def position(self) -> str:
        return POSITIONS[self.row][self.col]


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # in reading order (row by row, left to right)
    background: tuple[int, int, int]

    @property
    def layout_key(self) -> str:
        """What the scene shows, without jitter or background: the key its split is decided by."""
        return ";".join(f"{o.row}{o.col}:{o.size} {o.color} {o.shape}" for o in self.objects)


def pick(rng: random.Random, options):
    """One of `options` from `rng.random()` alone: the only random.Random method whose sequence
    Python promises to keep across versions."""
    return options[int(rng.random() * len(options))]


def quarter(x: float) -> float:
    return round(x * 4) / 4


def draw_layout(rng: random.Random) -> Scene:
    n = MIN_OBJECTS + int(rng.random() * (MAX_OBJECTS - MIN_OBJECTS + 1))
    cells = list(range(GRID * GRID))
    for i in range(len(cells) - 1, 0, -1):  # Fisher-Yates on rng.random()
        j = int(rng.random() * (i + 1))
        cells[i], cells[j] = cells[j], cells[i]
    taken, objects = set(), []
    for cell in sorted(cells[:n]):
        while True:
            attributes = (pick(rng, SHAPES), pick(rng, tuple(COLORS)), pick(rng, tuple(SIZES)))
            if attributes not in taken:
                break
        taken.add(attributes)
        shape, color, size = attributes
        lo, hi = SIZES[size]
        radius = quarter(lo + rng.random() * (hi - lo))
        row, col = divmod(cell, GRID)
        slack = CELL / 2 - radius - MARGIN
        cx = quarter((col + 0.5) * CELL + (2 * rng.random() - 1) * slack)
        cy = quarter((row + 0.5) * CELL + (2 * rng.random() - 1) * slack)
        objects.append(SceneObject(shape, color, size, row, col, cx, cy, radius))
    return Scene(tuple(objects), pick(rng, BACKGROUNDS))


def sample_scene(split: str, index: int) -> Scene:
    """Scene `index` of `split`: layouts are redrawn until one falls in the split's buckets."""
    rng = random.Random(stream_seed(split, index, "layout"))
    lo, hi = BUCKET_RANGES[split]
    while True:
        scene = draw_layout(rng)
        if lo <= layout_bucket(scene.layout_key) < hi:
            return scene


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Pixels (offsets dx, dy from the centre) inside a shape of half-extent r."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = quarter(0.85 * r)  # a square of the same half-extent looks larger than the circle
        return (ax <= s) & (ay <= s)
    if shape == "triangle":  # apex up, base at the bottom, as wide as it is tall
        return (dy >= -r) & (dy <= r) & (2 * ax <= dy + r)
    if shape == "diamond":
        return ax + ay <= r
    if shape == "cross":  # a plus sign with arms a third of its extent wide
        arm = quarter(r / 3)
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    raise ValueError(f"unknown shape {shape!r}")


def render_array(scene: Scene) -> np.ndarray:
    """The scene as an [H, W, 3] uint8 array."""
    image = np.empty((CANVAS, CANVAS, 3), dtype=np.uint8)
    image[:] = scene.background
    centres = np.arange(CANVAS, dtype=np.float64) + 0.5
    for o in scene.objects:
        mask = shape_mask(o.shape, centres[None, :] - o.cx, centres[:, None] - o.cy, o.radius)
        image[mask] = COLORS[o.color]
    return image


def render(scene: Scene):
    """The scene as an RGB PIL image."""
    from PIL import Image

    return Image.fromarray(render_array(scene))
