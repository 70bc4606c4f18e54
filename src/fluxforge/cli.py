"""The command line: `fluxforge generate`, `serve` and `info`, thin adapters over `Pipeline`.

stdout carries the results (one `PATH (seed N)` line per image, or the model summary); stderr carries the
progress bar, the settings used and errors. Errors are one `fluxforge: error: ...` line: exit 2 for a bad
command line, 1 for anything the library refuses (values, files, missing packages), 130 for Ctrl-C.
`--debug` lets the exception through with its traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from fluxforge.demo import DEMO_NOTICE, DEMO_PATH
from fluxforge.errors import CheckpointError

if TYPE_CHECKING:  # torch and the models are imported by the commands that use them, so --help is instant
    import torch

    from fluxforge.files import ModelFiles
    from fluxforge.sampling import StepInfo

PROG = "fluxforge"
_BAR_WIDTH = 30
# What the library raises for input a user can fix; anything else is a bug and keeps its traceback.
_USER_ERRORS = (ValueError, TypeError, CheckpointError, OSError, ImportError)


class UsageError(Exception):
    """A bad command line (exit code 2, as argparse uses)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the usage block and exits; this CLI reports every error as one line instead.
        raise UsageError(f"{message} (see {self.prog} --help)")


def resolve_model(args: argparse.Namespace) -> str:
    """The checkpoint a command loads: its -m / MODEL argument, else the built-in demo model (announced
    in one line on stderr, since its pictures are not FLUX.2's)."""
    if args.model is not None:
        return args.model
    given = [
        f"--{name.replace('_', '-')}"
        for name in ("vae", "text_encoder", "variant", "text_layers")
        if getattr(args, name)
    ]
    if given:
        raise UsageError(
            f"{' and '.join(given)} {'needs' if len(given) == 1 else 'need'} a model: "
            "pass -m MODEL (the built-in demo has its own)"
        )
    print(DEMO_NOTICE, file=sys.stderr)
    return str(DEMO_PATH)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except UsageError as exc:
        return _fail(str(exc), 2)
    try:
        return args.run(args)
    except UsageError as exc:
        return _fail(str(exc), 2)
    except _USER_ERRORS as exc:
        if args.debug:
            raise
        return _fail(_one_line(exc), 1)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        # A newline first: ^C usually lands in the middle of the progress bar.
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130


# -------------------------------------------------------------------------------------------------------
# Commands


def run_generate(args: argparse.Namespace) -> int:
    from fluxforge.pipeline import Pipeline

    device = "cpu" if args.offload else (args.device or "cpu")
    pipe = Pipeline.from_pretrained(**_model_arguments(args), device=device, dtype=args.dtype)
    if args.offload:
        pipe.enable_offload(args.device)
    for path, scale in args.lora or ():
        pipe.load_lora(path, scale=scale)
    result = pipe.generate(
        args.prompt,
        references=args.reference,
        init_image=args.init_image,
        strength=args.strength,
        mask=args.mask,
        negative_prompt=args.negative_prompt,
        width=args.width,
        height=args.height,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        num_images=args.num_images,
        on_step=progress_bar(sys.stderr),
    )
    info = result.info
    print(
        f"{info['variant']}, {info['mode']}, {info['width']}x{info['height']}, {info['steps']} steps, "
        f"{info['dtype']}",
        file=sys.stderr,
    )
    default_name = f"{PROG}-{result.seeds[0]}.png"
    target = args.output or Path(default_name)
    if target.is_dir():
        target = target / default_name
    for path, seed in zip(result.save(target), result.seeds, strict=True):
        print(f"{path} (seed {seed})")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from fluxforge.server import Settings, create_app
        from fluxforge.server.run import serve
    except ImportError as exc:
        raise ImportError(f"fluxforge serve needs FastAPI and uvicorn ({exc}); reinstall fluxforge") from exc
    from fluxforge.request import Limits

    model = resolve_model(args)
    settings = Settings(
        model=model,
        vae=args.vae,
        text_encoder=args.text_encoder,
        variant=args.variant,
        text_layers=args.text_layers,
        dtype=args.dtype,
        device=str(args.device or "cpu"),
        data=args.data,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        limits=Limits(
            max_references=args.max_references,
            max_pixels=args.max_pixels,
            max_images=args.max_n,
            max_prompt_chars=args.max_prompt_chars,
            max_input_pixels=args.max_input_pixels,
            max_steps=args.max_steps,
        ),
        api_key=args.api_key or None,
        webhook_secret=args.webhook_secret or None,
        grace=args.grace,
        retention=args.retention,
        keepalive=args.sse_keepalive,
        max_batch=args.max_batch,
        loras=tuple(args.lora or ()),
        offload=args.offload,
        cache_sizes={
            "prompts": args.cache_prompts,
            "latents": args.cache_latents,
            "reference_kv": args.cache_kv,
        },
    )
    del uvicorn
    if args.ray:
        try:
            from fluxforge.server.ray import serve_on_ray
        except ImportError as exc:
            raise ImportError(
                f"fluxforge serve --ray needs Ray Serve ({exc}): pip install 'fluxforge[ray]'"
            ) from exc
        return serve_on_ray(settings, args.host, args.port, args.replicas, args.autoscale, args.ray_address)
    if args.replicas != 1 or args.autoscale or args.ray_address:
        raise UsageError("--replicas, --autoscale and --ray-address need --ray")
    return serve(create_app(settings), args.host, args.port, args.log_level)


def run_info(args: argparse.Namespace) -> int:
    from fluxforge import files

    print(describe(files.find(**_model_arguments(args), dtype=args.dtype)))
    return 0


def describe(model: ModelFiles) -> str:
    """The summary `fluxforge info` prints: variant, defaults, parameters and dtype per network, files. Read
    from the configs and headers alone: no weights are loaded and no network is built."""
    from fluxforge import dtypes

    v, d, text = model.variant, model.variant.defaults, model.variant.text_encoder
    if d.guidance_mode == "none":
        guidance = "no guidance (distilled)"
    elif d.guidance_mode == "cfg":
        guidance = f"classifier-free guidance {d.guidance:g} (takes --negative-prompt)"
    else:
        guidance = f"embedded guidance {d.guidance:g}"
    lines = [
        f"variant      {v.name}",
        f"family       {v.family} (diffusers {v.pipeline_class})",
        f"defaults     {d.steps} steps, {guidance}, up to {d.max_sequence_length} text tokens",
        f"text layers  hidden states {', '.join(map(str, text.out_layers))} of {text.num_hidden_layers}"
        f" ({text.kind})",
        f"dtype        {model.dtype.summary()}",
        "",
        f"{'network':<36}{'parameters':>14}  dtype",
    ]
    counts = model.parameters()
    names = {
        "transformer": "transformer",
        "vae": "autoencoder",
        # Only the decoder layers whose hidden states are used are loaded, and so counted.
        "text_encoder": f"text encoder (first {text.layers_to_load} layers)",
    }
    for key, name in names.items():
        if key not in counts:
            lines.append(f"{name:<36}{'not loaded':>14}")
            continue
        lines.append(f"{name:<36}{counts[key]:>14,}  {dtypes.name(model.dtype.dtypes[key])}")
    lines += [f"{'total':<36}{sum(counts.values()):>14,}", "", "files"]
    paths = [model.path, model.vae.path if model.vae else None, model.text.folder if model.text else None]
    found = {f for p in paths if p is not None for f in (p.rglob("*.safetensors") if p.is_dir() else [p])}
    lines += [f"  {f}  {f.stat().st_size / 2**20:.1f} MiB" for f in sorted(found)]
    return "\n".join(lines)


def progress_bar(stream: TextIO) -> Callable[[StepInfo], None]:
    """An `on_step` callback drawing `step 3/4 [###...]`: redrawn in place on a terminal, one line per step
    elsewhere (logs, pipes), where carriage returns would pile up on one line."""
    redraw = stream.isatty()

    def show(info: StepInfo) -> None:
        filled = round(_BAR_WIDTH * info.step / info.total)
        bar = f"step {info.step}/{info.total} [{'#' * filled}{'.' * (_BAR_WIDTH - filled)}]"
        end = "\n" if info.step == info.total or not redraw else ""
        stream.write(("\r" if redraw else "") + bar + end)
        stream.flush()

    return show


# -------------------------------------------------------------------------------------------------------
# Arguments


def _parser() -> _Parser:
    parser = _Parser(prog=PROG, description="Generate images with the FLUX.2 models.")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="show the traceback of an error")

    gen = commands.add_parser(
        "generate",
        parents=[debug],
        help="generate images from a prompt",
        description="Generate images. An input image is used in one of three ways: -r (reference "
        "conditioning: attention tokens, never noised), --init-image with --strength (img2img), or "
        "--init-image with --mask (inpainting). See docs/modes.md.",
    )
    gen.set_defaults(run=run_generate)
    gen.add_argument("prompt", metavar="PROMPT")
    gen.add_argument(
        "-m",
        "--model",
        help="a diffusers FLUX.2 folder or a BFL transformer .safetensors file (default: the built-in demo)",
    )
    _model_options(gen)
    _run_options(gen)
    gen.add_argument(
        "--device",
        type=_device,
        help="where the networks run: cpu (default), cuda, cuda:1, mps",
    )
    gen.add_argument(
        "-r",
        "--reference",
        action="append",
        type=_image_file,
        metavar="REF",
        help="a reference image; repeat for several (-r a.png -r b.png)",
    )
    gen.add_argument(
        "--init-image", type=_image_file, metavar="IMG", help="the image to start from (img2img)"
    )
    gen.add_argument(
        "--strength",
        type=float,
        metavar="S",
        help="with --init-image: how much of the schedule to run, in (0, 1] (1 ignores the image's content; "
        "inpainting defaults to 1)",
    )
    gen.add_argument(
        "--mask",
        type=_image_file,
        help="with --init-image: white (>= 0.5) marks the area to repaint, black the area to keep",
    )
    gen.add_argument("--negative-prompt", metavar="TEXT", help="base (CFG) models only")
    size = "px, rounded down to the token grid (16 px); default: the init image's, else the first reference's"
    gen.add_argument("-W", "--width", type=int, help=f"output width in {size}, else the model's")
    gen.add_argument("-H", "--height", type=int, help=f"output height in {size}, else the model's")
    gen.add_argument("--steps", type=int, metavar="N", help="default: the model's (fluxforge info shows it)")
    gen.add_argument(
        "--guidance", type=float, metavar="G", help="dev and base models only; default: the model's"
    )
    gen.add_argument("--seed", type=int, metavar="S", help="image i uses seed S + i (default: random)")
    gen.add_argument(
        "--lora",
        action="append",
        type=_lora_file,
        metavar="FILE[:SCALE]",
        help="apply a LoRA / LoKr file of any trainer's layout at SCALE (default 1); repeatable",
    )
    gen.add_argument("-n", "--num-images", type=int, default=1, metavar="N")
    gen.add_argument(
        "-o",
        "--output",
        type=_output,
        metavar="OUT",
        help=f"a .png path or a folder (default: ./{PROG}-SEED.png); several images get -0, -1, ...",
    )

    srv = commands.add_parser(
        "serve",
        parents=[debug],
        help="run the HTTP server (OpenAI-compatible images API, async jobs)",
        description="Serve a model over HTTP: the OpenAI-compatible /v1/images endpoints, durable async jobs "
        "(/v1/jobs) with live progress and cancel, /health, /v1/capabilities and /metrics. Jobs and their "
        "files live under --data and survive a restart. The limits apply to every request, with the same "
        "rules and messages as the Python API.",
    )
    srv.set_defaults(run=run_serve)
    srv.add_argument("-m", "--model", help="a FLUX.2 folder, BFL file or hub id (default: the built-in demo)")
    _model_options(srv)
    _run_options(srv)
    srv.add_argument("--device", type=_device, help="where the networks run (default: cpu)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    srv.add_argument(
        "--port", type=int, default=8000, help="port to bind; 0 picks a free one (default: 8000)"
    )
    srv.add_argument(
        "--data",
        type=Path,
        default=Path("fluxforge-data"),
        help="jobs database and files (default: ./fluxforge-data)",
    )
    srv.add_argument(
        "--max-queue", type=_positive, default=16, metavar="N", help="jobs waiting, else 429 (16)"
    )
    srv.add_argument(
        "--max-body-bytes",
        type=_positive,
        default=32 * 2**20,
        metavar="B",
        help="request body, else 413 (32 MiB)",
    )
    srv.add_argument(
        "--max-input-pixels",
        type=_positive,
        default=64 * 2**20,
        metavar="PX",
        help="pixels of one input image, read from its header before decoding, else 413 (64 Mi)",
    )
    srv.add_argument(
        "--max-pixels", type=_positive, default=4 * 2**20, metavar="PX", help="output width x height (4 Mi)"
    )
    srv.add_argument(
        "--max-steps", type=_positive, default=1000, metavar="N", help="steps per request (1000)"
    )
    srv.add_argument(
        "--max-references", type=_positive, default=10, metavar="N", help="reference images (10)"
    )
    srv.add_argument("--max-n", type=_positive, default=4, metavar="N", help="images per request (4)")
    srv.add_argument(
        "--max-prompt-chars",
        type=_positive,
        default=20_000,
        metavar="N",
        help="characters per prompt (20000)",
    )
    srv.add_argument(
        "--api-key",
        default=os.environ.get("FLUXFORGE_API_KEY"),
        help="require Authorization: Bearer KEY on "
        "/v1 and /metrics (default: $FLUXFORGE_API_KEY; none: open)",
    )
    srv.add_argument(
        "--webhook-secret",
        default=os.environ.get("FLUXFORGE_WEBHOOK_SECRET"),
        help="HMAC-SHA256 key that signs webhooks; without it requests may not ask for one "
        "(default: $FLUXFORGE_WEBHOOK_SECRET)",
    )
    srv.add_argument(
        "--grace",
        type=_duration,
        default=30.0,
        metavar="T",
        help="after SIGTERM, time the running job may take to finish before it goes back to the queue (30s)",
    )
    srv.add_argument(
        "--retention",
        type=_duration,
        default=7 * 86400.0,
        metavar="T",
        help="how long finished jobs and their files are kept: 90s, 30m, 12h, 7d (7d)",
    )
    for name, default, what in (
        ("prompts", 256, "prompt embeddings"),
        ("latents", 256, "reference and init-image latents"),
        ("kv", 2048, "reference K/V of klein KV models"),
    ):
        srv.add_argument(
            f"--cache-{name}",
            type=_megabytes,
            default=default * 2**20,
            metavar="MIB",
            help=f"cache of {what}, in MiB; 0 turns it off ({default})",
        )
    srv.add_argument(
        "--max-batch",
        type=_positive,
        default=1,
        metavar="N",
        help="run up to N waiting jobs of the same shape (settings and image sizes; prompts, seeds and image "
        "contents may differ) as one batch (1: off; each image is the one it is alone)",
    )
    srv.add_argument(
        "--lora",
        action="append",
        type=_named_lora,
        metavar="NAME=FILE",
        help='load a LoRA / LoKr file as NAME; requests opt in with "loras": [{"name": NAME, "scale": S}] '
        "(none is applied otherwise); repeatable",
    )
    scale = srv.add_mutually_exclusive_group()
    srv.add_argument(
        "--ray",
        action="store_true",
        help="run on Ray Serve: this API as the ingress, the model as replicas (needs fluxforge[ray])",
    )
    scale.add_argument(
        "--replicas", type=_positive, default=1, metavar="N", help="model replicas with --ray (1)"
    )
    scale.add_argument(
        "--autoscale",
        type=_range,
        metavar="MIN:MAX",
        help="with --ray: Ray Serve scales the replicas between MIN and MAX on their ongoing requests",
    )
    srv.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="with --ray: join this cluster (auto: the local one) instead of starting one",
    )
    srv.add_argument("--sse-keepalive", type=_duration, default=15.0, metavar="T", help=argparse.SUPPRESS)
    srv.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))

    inf = commands.add_parser(
        "info", parents=[debug], help="describe a model", description="Describe a model and its files."
    )
    inf.set_defaults(run=run_info)
    inf.add_argument("model", nargs="?", metavar="MODEL")
    _model_options(inf)
    return parser


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16", "stored"),
        default="auto",
        help="compute dtype; auto (default): as stored where this device computes it natively, else float32",
    )
    parser.add_argument(
        "--text-layers",
        type=_layers,
        metavar="K,K,K",
        help="the text encoder's hidden states to read (default: the model's; diffusers' 9,18,27 or 10,20,30 "
        "for other sizes)",
    )
    parser.add_argument("--vae", metavar="PATH", help="the autoencoder, for a BFL transformer file")
    parser.add_argument("--text-encoder", metavar="PATH", help="a transformers folder with its tokenizer")
    parser.add_argument(
        "--variant", metavar="NAME", help="override variant detection, e.g. flux.2-klein-base-4b"
    )


def _run_options(parser: argparse.ArgumentParser) -> None:
    """What the commands that run a model take beside the model options."""
    parser.add_argument(
        "--offload",
        action="store_true",
        help="keep the networks on the CPU, each on the accelerator (--device, default: the one there is) "
        "only while it runs: for models that do not fit; changes nothing without an accelerator",
    )


def _model_arguments(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        path=resolve_model(args),
        vae=args.vae,
        text_encoder=args.text_encoder,
        variant=args.variant,
        text_encoder_out_layers=args.text_layers,
    )


def _lora_file(value: str) -> tuple[str, float]:
    """FILE or FILE:SCALE (a path may hold colons: only a number after the last one is a scale)."""
    path, _, scale = value.rpartition(":")
    try:
        number = float(scale)
    except ValueError:
        return _existing(value), 1.0
    return _existing(path or value), number


def _range(value: str) -> tuple[int, int]:
    low, sep, high = value.partition(":")
    try:
        pair = (int(low), int(high))
    except ValueError:
        pair = None
    if not sep or pair is None or not 0 <= pair[0] <= pair[1] or pair[1] < 1:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 0 <= MIN <= MAX and MAX >= 1, got {value!r}")
    return pair


def _named_lora(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE, got {value!r}")
    return name, _existing(path)


def _existing(path: str) -> str:
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    return path


def _layers(value: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(k) for k in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: give layer numbers separated by commas, e.g. 9,18,27"
        ) from None
    if not layers or min(layers) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: layers are numbered from 1")
    return layers


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _megabytes(value: str) -> int:
    try:
        mib = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a size in MiB") from None
    if not mib >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 MiB, got {value}")
    return int(mib * 2**20)


def _duration(value: str) -> float:
    """90, 90s, 30m, 12h or 7d -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (value[:-1], value[-1]) if value[-1:] in units else (value, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a duration (90s, 30m, 12h, 7d)") from None
    if not seconds >= 0:
        raise argparse.ArgumentTypeError(f"{value!r} is negative")
    return seconds


def _image_file(value: str) -> str:
    # Checked while parsing, so that a typo fails before a model of several GB is loaded.
    if not Path(value).is_file():
        raise argparse.ArgumentTypeError(f"no file at {value!r}")
    return value


def _device(value: str) -> torch.device:
    import torch

    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a torch device (cpu, cuda, cuda:1, mps)"
        ) from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise argparse.ArgumentTypeError(f"{value!r} is not available with this machine and torch build")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{value!r}: only {torch.cuda.device_count()} CUDA devices here")
    return device


def _output(value: str) -> Path:
    path = Path(value)
    if path.is_dir():
        return path
    if path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(
            f"{value!r}: images are written as PNG (with their settings); use .png"
        )
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"no folder {str(path.parent)!r} to write {path.name!r} into")
    return path


# -------------------------------------------------------------------------------------------------------
# Errors


def _one_line(exc: BaseException) -> str:
    """The first line of the message; a CheckpointError's file and key lists are summarised."""
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, CheckpointError):
        if exc.path:
            first += f" ({exc.path})"
        keys = len(exc.missing) + len(exc.unexpected) + len(exc.mismatched)
        if keys:
            first += f"; {keys} keys do not fit, --debug lists them"
    return first


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code
