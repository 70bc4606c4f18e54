"""The command line end to end: `python -m fluxforge` as a subprocess on a tiny klein checkpoint (one run
per mode, since each start-up imports torch), and its error lines in process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from conftest import parts
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

from fluxforge import cli
from fluxforge.images import read_png_metadata


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A folder with a tiny distilled klein checkpoint (klein/) and three input images."""
    root = tmp_path_factory.mktemp("cli")
    Flux2KleinPipeline(**parts(), is_distilled=True).save_pretrained(root / "klein")
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "ref.png")
    PIL.Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(root / "init.png")
    mask = np.zeros((32, 48), dtype=np.uint8)
    mask[8:24, 12:40] = 255
    PIL.Image.fromarray(mask).save(root / "mask.png")
    return root


def fluxforge(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fluxforge", *map(str, args)]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fluxforge: error: "), stderr
    return lines[0]


def test_text_to_image(folder):
    out = folder / "fox.png"
    done = fluxforge(
        "generate",
        "a red fox",
        "-m",
        "klein",
        "-W",
        48,
        "-H",
        32,
        "--steps",
        3,
        "--seed",
        7,
        "-o",
        out,
        cwd=folder,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{out} (seed 7)"]
    assert "step 3/3 [" in done.stderr and "text-to-image, 48x32, 3 steps" in done.stderr
    assert PIL.Image.open(out).size == (48, 32)
    meta = read_png_metadata(out)
    assert (meta["prompt"], meta["seed"], meta["steps"], meta["mode"]) == ("a red fox", 7, 3, "text-to-image")


def test_references_with_two_images_and_default_names(folder):
    work = folder / "references"
    work.mkdir()
    done = fluxforge(
        "generate",
        "the same, in blue",
        "-m",
        folder / "klein",
        "-r",
        folder / "ref.png",
        "-n",
        2,
        "--steps",
        2,
        "--seed",
        11,
        cwd=work,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["fluxforge-11-0.png (seed 11)", "fluxforge-11-1.png (seed 12)"]
    for name, seed in (("fluxforge-11-0.png", 11), ("fluxforge-11-1.png", 12)):
        assert PIL.Image.open(work / name).size == (56, 40)  # the reference's size by default
        meta = read_png_metadata(work / name)
        assert (meta["mode"], meta["seed"], meta["steps"]) == ("references", seed, 2)


def test_inpainting(folder):
    done = fluxforge(
        "generate",
        "a hat",
        "-m",
        "klein",
        "--init-image",
        "init.png",
        "--mask",
        "mask.png",
        "--strength",
        0.5,
        "--steps",
        4,
        "--seed",
        3,
        "-o",
        "hat.png",
        cwd=folder,
    )
    assert done.returncode == 0, done.stderr
    assert "step 2/2 [" in done.stderr  # strength 0.5 runs the second half of the 4-step schedule
    meta = read_png_metadata(folder / "hat.png")
    assert (meta["mode"], meta["strength"], meta["steps"], meta["seed"]) == ("inpaint", 0.5, 2, 3)
    assert PIL.Image.open(folder / "hat.png").size == (48, 32)


def test_info(folder):
    done = fluxforge("info", "klein", cwd=folder)
    assert done.returncode == 0, done.stderr
    assert "variant      flux.2-klein-custom" in done.stdout
    assert "no guidance (distilled)" in done.stdout and "hidden states 9, 18, 27 of 28" in done.stdout
    transformer = next(line for line in done.stdout.splitlines() if line.startswith("transformer "))
    count = sum(
        p.numel() for p in Flux2Transformer2DModel.from_pretrained(folder / "klein/transformer").parameters()
    )
    assert transformer.split()[1:] == [f"{count:,}", "float32"]
    assert "transformer/diffusion_pytorch_model.safetensors" in done.stdout


def test_a_missing_model_is_one_line_in_a_subprocess(folder):
    done = fluxforge("generate", "a cat", "-m", "no-such-model", cwd=folder)
    assert done.returncode == 1
    assert one_error_line(done.stderr) == "fluxforge: error: no such file or folder (no-such-model)"


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--strength", "0.5"], 1, "strength= needs init_image="),
        (
            ["--variant", "flux.2-klien-4b"],
            1,
            "unknown variant 'flux.2-klien-4b'. Did you mean 'flux.2-klein-4b'",
        ),
        (["--steps", "0"], 1, "steps must be in [1, 1000], got 0"),
        (["-r", "missing.png"], 2, "argument -r/--reference: no file at 'missing.png'"),
        (["-o", "fox.jpg"], 2, "use .png"),
        (["--steps", "four"], 2, "argument --steps: invalid int value: 'four'"),
        (["--device", "gpu"], 2, "argument --device: 'gpu' is not a torch device (cpu, cuda, cuda:1, mps)"),
    ],
)
def test_bad_input_is_one_line(folder, capsys, monkeypatch, args, code, message):
    monkeypatch.chdir(folder)
    assert cli.main(["generate", "a cat", "-m", "klein", *args]) == code
    captured = capsys.readouterr()
    assert message in one_error_line(captured.err) and captured.out == ""


def test_no_model_uses_the_demo_and_says_so(tmp_path, capsys):
    out = tmp_path / "circle.png"
    prompt = "a red circle on a blue background, top left"
    assert cli.main(["generate", prompt, "--seed", "0", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines()[0] == "using the built-in demo model; pass -m for a FLUX.2 checkpoint"
    assert captured.out.splitlines() == [f"{out} (seed 0)"]
    assert PIL.Image.open(out).size == (64, 64)
    assert read_png_metadata(out)["variant"] == "fluxforge-demo"

    assert cli.main(["info"]) == 0
    captured = capsys.readouterr()
    assert "fluxforge-demo" in captured.out and "built-in demo" in captured.err


def test_model_options_without_a_model_say_so(capsys):
    assert cli.main(["generate", "a cat", "--vae", "ae.safetensors"]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "fluxforge: error: --vae needs a model: pass -m MODEL (the built-in demo has its own)"
    )


def test_debug_shows_the_exception(folder, monkeypatch):
    monkeypatch.chdir(folder)
    with pytest.raises(ValueError, match="strength= needs init_image="):
        cli.main(["generate", "a cat", "-m", "klein", "--strength", "0.5", "--debug"])


def test_help_and_info_import_no_model_code(folder):
    """--help answers without torch; info reads configs and headers, builds no network, reads no weights."""
    code = (
        "import sys\nfrom fluxforge import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch after --help:', 'torch' in sys.modules)\n"
        "from fluxforge import checkpoint\n"
        "checkpoint.Tensors.read = lambda self, keys: sys.exit('info read tensor data')\n"
        f"assert cli.main(['info', {str(folder / 'klein')!r}]) == 0\n"
        "print('model code after info:', sorted(m for m in sys.modules if m.startswith('fluxforge.model')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "torch after --help: False" in done.stdout
    assert "model code after info: []" in done.stdout
    assert "variant      flux.2-klein-custom" in done.stdout


def test_ray_options_need_ray(capsys):
    assert cli.main(["serve", "--replicas", "2"]) == 2
    assert "--replicas, --autoscale and --ray-address need --ray" in capsys.readouterr().err
    assert cli.main(["serve", "--ray", "--autoscale", "3:1"]) == 2
    assert "expected MIN:MAX with 0 <= MIN <= MAX" in capsys.readouterr().err
    assert cli.main(["serve", "--ray", "--replicas", "2", "--autoscale", "1:2"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
