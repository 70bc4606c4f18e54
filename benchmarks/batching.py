"""Throughput of the server's worker with N compatible requests waiting together, run one by one
(--max-batch 1) and as one batch (--max-batch N), in process with the demo model: text-to-image, or with
a reference image (--mode references), an init image (--mode img2img) or an init image and a mask
(--mode inpaint), each job its own picture of the same size (--same-images: one picture for every job).

    python benchmarks/batching.py [--mode text-to-image] [--steps 12] [--repeats 3] [--size 64]

N jobs are queued behind a short blocker job; the clock starts when the blocker ends and stops when all N
have finished (medians of the repeats).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import fluxforge as ff
from fluxforge.server import Settings, create_app
from fluxforge.server.protocol import JobBody, job_submission

PROMPTS = ["a red circle on a blue background, top left", "a yellow star on a green background, center"]


def images(mode: str, job: int, same: bool) -> dict:
    """The request fields of a mode: a 64 x 64 picture of the job's own colour (or one for every job)."""
    import base64
    import io

    import PIL.Image

    def url(image: PIL.Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    k = 0 if same else job
    picture = url(PIL.Image.new("RGB", (64, 64), (200 - 20 * k % 200, 30 + 25 * k % 220, 30)))
    mask = PIL.Image.new("L", (64, 64), 0)
    mask.paste(255, (8 + 2 * k % 24, 16, 40 + 2 * k % 24, 48))
    return {
        "text-to-image": {},
        "references": {"references": [picture]},
        "img2img": {"init_image": picture, "strength": 0.6},
        "inpaint": {"init_image": picture, "mask": url(mask), "strength": 0.8},
    }[mode]


def run(pipe: ff.Pipeline, data: Path, n: int, max_batch: int, args: argparse.Namespace) -> float:
    steps, size = args.steps, args.size
    app = create_app(Settings(data=data, max_queue=64, max_batch=max_batch), load=lambda: pipe)
    service = app.state.service
    service.start()
    while service.worker.state != "ready":
        time.sleep(0.01)
    blocker, _ = service.admit(job_submission(JobBody(prompt=PROMPTS[0], steps=20, seed=0)))
    jobs = [
        service.admit(
            job_submission(
                JobBody(
                    prompt=PROMPTS[i % 2],
                    steps=steps,
                    seed=i,
                    width=size,
                    height=size,
                    **images(args.mode, i, args.same_images),
                )  # fmt: skip
            )
        )[0]
        for i in range(n)
    ]
    while not service.store.get(blocker.id).final:
        time.sleep(0.001)
    start = time.perf_counter()
    while not all(service.store.get(j.id).final for j in jobs):
        time.sleep(0.001)
    seconds = time.perf_counter() - start
    statuses = {service.store.get(j.id).status for j in jobs}
    assert statuses == {"succeeded"}, statuses
    service.stop()
    service.store.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--mode", choices=("text-to-image", "references", "img2img", "inpaint"), default="text-to-image"
    )
    parser.add_argument("--same-images", action="store_true", help="one picture for every job")
    args = parser.parse_args()
    pipe = ff.Pipeline.from_pretrained()
    print(
        f"demo model, {args.mode}, {'the same images' if args.same_images else 'each job its own images'}, "
        f"{args.size}x{args.size}, {args.steps} steps (CFG), medians of {args.repeats}"
    )
    print(f"{'waiting':>8s} {'one by one':>12s} {'batched':>12s} {'gain':>6s}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2, 4, 8):
            times = {}
            for max_batch in (1, n):
                folder = Path(tmp) / f"{n}-{max_batch}"
                runs = [run(pipe, folder / str(r), n, max_batch, args) for r in range(args.repeats)]
                times[max_batch] = statistics.median(runs)
            alone, batched = times[1], times[n]
            print(f"{n:8d} {n / alone:8.1f} im/s {n / batched:8.1f} im/s {alone / batched:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
