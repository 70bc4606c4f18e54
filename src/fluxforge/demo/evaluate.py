"""Measure the demo model with the rule-based checker of `fluxforge.demo.data`, on scenes and seeds that
training never drew (training draws from `numpy.random.default_rng(0)`; these use their own seeds and are
compared by caption, not by seed).

Measurements, each over `n` cases:
  text_to_image  the prompt's shape colour is the picture's (and, reported too, its background and position);
  recolour       "the same shape in <colour>" with the scene as a reference: the new colour, at the
                 reference's position;
  edit           "move it to the <position>" or "the shape from image 1 on the background of image 2": the
                 picture is the edit's target scene;
  inpaint        the scene as init image, its shape's grid cell masked, "the same shape in <colour>": the
                 masked cell changes, the rest stays within a small pixel error of the source.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image

from fluxforge.demo import data

BATCH = 10  # prompts per generate() call: fast, and within the pipeline's 16 images per request


@dataclass(frozen=True)
class Score:
    name: str
    n: int
    hits: dict[str, int]  # criterion -> cases that met it

    def rate(self, criterion: str) -> float:
        return self.hits[criterion] / self.n

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v}/{self.n} ({v / self.n:.0%})" for k, v in self.hits.items())
        return f"{self.name}: {parts}"


def _cases(n: int, seed: int) -> list[tuple[data.Scene, str]]:
    """n held-out scenes, each with a new colour that is neither its shape's nor its background's."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = data.random_scene(rng)
        out.append((scene, data.other(rng, list(data.COLOURS), scene.colour, scene.background)))
    return out


def _tally(name: str, n: int, checks: list[dict[str, bool]]) -> Score:
    return Score(name, n, {k: sum(c[k] for c in checks) for k in checks[0]})


def text_to_image(pipe, n: int = 50, seed: int = 1000) -> Score:
    """`pipe` is a fluxforge Pipeline loaded with the demo model."""
    cases, checks = _cases(n, seed), []
    for start in range(0, n, BATCH):
        scenes = [scene for scene, _ in cases[start : start + BATCH]]
        result = pipe.generate([s.caption for s in scenes], seed=seed + start)
        for scene, image in zip(scenes, result.images, strict=True):
            found = data.analyse(image)
            checks.append(
                {
                    "colour": found.colour == scene.colour,
                    "background": found.background == scene.background,
                    "position": found.position == scene.position,
                }
            )
    return _tally("text-to-image", n, checks)


def _per_case(
    pipe, n: int, seed: int, call: Callable[[data.Scene, str, int], PIL.Image.Image]
) -> list[tuple[data.Scene, str, PIL.Image.Image]]:
    cases = _cases(n, seed)
    return [(scene, colour, call(scene, colour, seed + i)) for i, (scene, colour) in enumerate(cases)]


def recolour(pipe, n: int = 50, seed: int = 2000) -> Score:
    def call(scene: data.Scene, colour: str, s: int) -> PIL.Image.Image:
        return pipe.generate(f"the same shape in {colour}", references=[scene.render()], seed=s).images[0]

    checks = []
    for scene, colour, image in _per_case(pipe, n, seed, call):
        found = data.analyse(image)
        checks.append(
            {
                "colour": found.colour == colour,
                "position kept": found.position == scene.position,
                "background kept": found.background == scene.background,
            }
        )
    return _tally("recolour edit", n, checks)


def edit(pipe, task: str, n: int = 50, seed: int = 4000) -> Score:
    """One of the trained reference edits (`data.EDITS`: "move", "combine", "recolour") on held-out scenes,
    as training phrases it: the picture must be the edit's target scene (colour, background, position)."""
    rng, checks = np.random.default_rng(seed), []
    for i in range(n):
        example = data.EDITS[task](rng, data.random_scene(rng))
        references = [scene.render() for scene in example.references]
        found = data.analyse(pipe.generate(example.caption, references=references, seed=seed + i).images[0])
        target = example.target
        checks.append(
            {
                "colour": found.colour == target.colour,
                "background": found.background == target.background,
                "position": found.position == target.position,
            }
        )
    return _tally(f"{task} edit", n, checks)


# Mean absolute pixel change (0..1) outside the mask that still counts as kept: the VAE's round trip and
# its decoder's reach across the mask's edge. Inside the mask, a change beyond it counts as repainted.
KEEP_TOLERANCE = 12 / 255


def inpaint(pipe, n: int = 20, seed: int = 3000) -> Score:
    def call(scene: data.Scene, colour: str, s: int) -> PIL.Image.Image:
        return pipe.generate(
            f"the same shape in {colour}", init_image=scene.render(), mask=data.inpaint_mask(scene), seed=s
        ).images[0]

    checks = []
    for scene, colour, image in _per_case(pipe, n, seed, call):
        source = np.asarray(scene.render(), dtype=np.float32) / 255
        out = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
        inside = np.asarray(data.inpaint_mask(scene)) >= 128
        diff = np.abs(out - source).mean(-1)
        checks.append(
            {
                "masked region changed": float(diff[inside].mean()) > KEEP_TOLERANCE,
                "rest kept": float(diff[~inside].mean()) <= KEEP_TOLERANCE,
                "colour": data.analyse(image).colour == colour,
            }
        )
    return _tally("inpainting", n, checks)
