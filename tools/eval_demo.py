"""Measure the built-in demo model on held-out scenes and seeds (see fluxforge.demo.evaluate).

python tools/eval_demo.py                 # the packaged weights; about a minute on 2 CPU cores
python tools/eval_demo.py -m /tmp/demo    # another training run's folder
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from fluxforge.demo import evaluate
from fluxforge.pipeline import Pipeline


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-m", "--model", default=None, help="a demo folder (default: the packaged one)")
    parser.add_argument("-n", type=int, default=50, help="cases per measurement (inpainting: n / 2.5)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained(args.model)
    for measure, n in (
        (evaluate.text_to_image, args.n),
        (evaluate.recolour, args.n),
        (partial(evaluate.edit, task="move"), args.n),
        (partial(evaluate.edit, task="combine"), args.n),
        (evaluate.inpaint, max(1, round(args.n / 2.5))),
    ):
        started = time.perf_counter()
        score = measure(pipe, n=n)
        print(f"{score}  [{time.perf_counter() - started:.1f} s]", flush=True)


if __name__ == "__main__":
    main()
