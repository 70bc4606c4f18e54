"""Procedural scenes for the built-in demo model, and a rule-based checker of generated pictures.

A scene is one flat-coloured shape (circle, square, triangle, star) on a flat background, at one of nine
positions of a 3 x 3 grid, drawn at 64 x 64 pixels. Captions follow one template so that a tiny model can
learn them: "a red circle on a blue background, top left". Edit examples pair a target scene with one or
two reference scenes and an instruction ("the same shape in green", "move it to the bottom right", "the
shape from image 1 on the background of image 2"). Everything is pure numpy / PIL and driven by a
`numpy.random.Generator`, so a seed fixes the whole data set.

`analyse` reads a picture back: the background colour (the corners), the shape's colour (the palette
colour nearest to the shape pixels farthest from the background's) and its position (the centroid's grid
cell). The tests and `tools/eval_demo.py` measure the model with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import PIL.Image
import PIL.ImageDraw

SIZE = 64  # pixels per side of every scene

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
# Grid cell (row, column) of each position name, as captions spell them.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}
# The words of every caption; the demo tokenizer makes each one a single token.
VOCABULARY = (
    *COLOURS,
    *SHAPES,
    *{word for name in POSITIONS for word in name.split()},
    *"a on background the same shape in move it to from image of".split(),
)

_CELL = SIZE / 3
_RADIUS = 9.0  # half the shape's size in pixels; a third of a grid cell is left around it


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    position: str
    jitter: tuple[float, float] = (0.0, 0.0)  # (dy, dx) pixels off the cell's centre
    scale: float = 1.0  # multiplies _RADIUS

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background, {self.position}"

    @property
    def centre(self) -> tuple[float, float]:
        """(y, x) of the shape's centre in pixels."""
        row, col = POSITIONS[self.position]
        return (row + 0.5) * _CELL + self.jitter[0], (col + 0.5) * _CELL + self.jitter[1]

    def render(self) -> PIL.Image.Image:
        image = PIL.Image.new("RGB", (SIZE, SIZE), COLOURS[self.background])
        cy, cx = self.centre
        r = _RADIUS * self.scale
        draw, fill = PIL.ImageDraw.Draw(image), COLOURS[self.colour]
        if self.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif self.shape == "square":
            s = r * 0.85  # same visual weight as the circle
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        elif self.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
        else:  # five-pointed star: outer and inner radius alternate
            points = [
                (cx + rad * math.sin(k * math.pi / 5), cy - rad * math.cos(k * math.pi / 5))
                for k, rad in ((k, r if k % 2 == 0 else r * 0.45) for k in range(10))
            ]
            draw.polygon(points, fill=fill)
        return image


def random_scene(rng: np.random.Generator) -> Scene:
    colour, background = rng.choice(list(COLOURS), size=2, replace=False)
    return Scene(
        shape=str(rng.choice(SHAPES)),
        colour=str(colour),
        background=str(background),
        position=str(rng.choice(list(POSITIONS))),
        jitter=(float(rng.uniform(-2, 2)), float(rng.uniform(-2, 2))),
        scale=float(rng.uniform(0.85, 1.15)),
    )


@dataclass(frozen=True)
class Example:
    """One training or evaluation example: make `target` from `caption` and the `references`."""

    caption: str
    target: Scene
    references: tuple[Scene, ...] = ()


def other(rng: np.random.Generator, options: list[str], *exclude: str) -> str:
    return str(rng.choice([o for o in options if o not in exclude]))


def recolour(rng: np.random.Generator, source: Scene) -> Example:
    colour = other(rng, list(COLOURS), source.colour, source.background)
    return Example(f"the same shape in {colour}", replace(source, colour=colour), (source,))


def move(rng: np.random.Generator, source: Scene) -> Example:
    position = other(rng, list(POSITIONS), source.position)
    return Example(f"move it to the {position}", replace(source, position=position), (source,))


def combine(rng: np.random.Generator, source: Scene) -> Example:
    backdrop = random_scene(rng)
    while backdrop.background == source.colour:
        backdrop = random_scene(rng)
    return Example(
        "the shape from image 1 on the background of image 2",
        replace(source, background=backdrop.background),
        (source, backdrop),
    )


EDITS = {"recolour": recolour, "move": move, "combine": combine}


def text_to_image(rng: np.random.Generator) -> Example:
    scene = random_scene(rng)
    return Example(scene.caption, scene)


def to_array(image: PIL.Image.Image) -> np.ndarray:
    """[3, H, W] float32 in [-1, 1], the VAE's input range."""
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0


TOKEN = 8  # pixels per DiT token side (VAE scale 4 x patch 2)


def inpaint_mask(scene: Scene) -> PIL.Image.Image:
    """White (repaint) over the shape's bounding box, widened to whole tokens so that no token outside the
    mask is partly repainted; black elsewhere."""
    cy, cx = scene.centre
    r = _RADIUS * scene.scale + 1
    lo = [max(0, math.floor((c - r) / TOKEN) * TOKEN) for c in (cx, cy)]
    hi = [min(SIZE, math.ceil((c + r) / TOKEN) * TOKEN) for c in (cx, cy)]
    mask = PIL.Image.new("L", (SIZE, SIZE), 0)
    PIL.ImageDraw.Draw(mask).rectangle((lo[0], lo[1], hi[0] - 1, hi[1] - 1), fill=255)
    return mask


# ---------------------------------------------------------------------------------------------------------
# Reading a picture back


@dataclass(frozen=True)
class Analysis:
    background: str  # the palette colour of the corners
    colour: str | None  # the shape's palette colour; None when too few pixels differ from the background
    position: str | None  # the grid cell of their centroid
    coverage: float  # fraction of pixels that are not background


def nearest_colours(pixels: np.ndarray) -> np.ndarray:
    """[..., 3] uint8 RGB -> [...] index into COLOURS of the nearest palette colour."""
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    d = ((pixels[..., None, :].astype(np.float32) - palette) ** 2).sum(-1)
    return d.argmin(-1)


def analyse(image: PIL.Image.Image) -> Analysis:
    pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE)))
    labels = nearest_colours(pixels)
    names = list(COLOURS)
    corners = labels[[0, 0, -1, -1], [0, -1, 0, -1]]
    background = int(np.bincount(corners, minlength=len(names)).argmax())
    foreground = labels != background
    coverage = float(foreground.mean())
    if foreground.sum() < 20:  # a few stray pixels are not a shape
        return Analysis(names[background], None, None, coverage)
    # A soft edge blends the shape's colour into the background's (red on yellow gives orange pixels), and on
    # a small shape the edge outnumbers the inside: read the colour from the half of the pixels that lie
    # farthest from the background's colour.
    shape = pixels[foreground].astype(np.float32)
    distance = ((shape - np.array(COLOURS[names[background]], dtype=np.float32)) ** 2).sum(-1)
    core = shape[distance >= np.median(distance)]
    colour = int(nearest_colours(np.median(core, axis=0).astype(np.uint8)))
    ys, xs = np.nonzero(foreground)
    cell = (min(int(ys.mean() // _CELL), 2), min(int(xs.mean() // _CELL), 2))
    position = next(name for name, rc in POSITIONS.items() if rc == cell)
    return Analysis(names[background], names[colour], position, coverage)
