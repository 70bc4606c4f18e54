"""LoRA over HTTP and on the command line: `fluxforge serve --lora NAME=FILE` (none applied unless a request
opts in with "loras"), listed by /v1/capabilities, the same images as the Python API; `generate --lora`."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from safetensors.torch import save_file
from serving import PROMPT, Server, picture, png, wait_status
from test_lora import diffusers_lora, in_blocks

import fluxforge as ff
from fluxforge import cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two LoRA files for the demo model: diffusers keys on every layer, and PEFT keys on the blocks."""
    root = tmp_path_factory.mktemp("loras")
    model = ff.Pipeline.from_pretrained().transformer
    style = {f"transformer.{k}": v for k, v in diffusers_lora(model, rank=2, seed=1).items()}
    blocks = {f"base_model.model.{k}": v for k, v in diffusers_lora(model, seed=2, where=in_blocks).items()}
    save_file(style, root / "style.safetensors")
    save_file(blocks, root / "blocks.safetensors")
    return root / "style.safetensors", root / "blocks.safetensors"


@pytest.fixture(scope="module")
def pipe(files):
    pipe = ff.Pipeline.from_pretrained()
    pipe.load_lora(files[0], name="style")
    pipe.load_lora(files[1], name="blocks")
    pipe.set_loras({})
    return pipe


@pytest.fixture(scope="module")
def server(tmp_path_factory, files):
    data = tmp_path_factory.mktemp("serve") / "data"
    s = Server(data, "--lora", f"style={files[0]}", "--lora", f"blocks={files[1]}")
    yield s
    s.stop()


def image(data: dict) -> np.ndarray:
    return picture(base64.b64decode(data["b64_json"]))


def test_capabilities_list_the_loras(server):
    with server.http() as client:
        loras = client.get("/v1/capabilities").json()["loras"]
    assert [(x["name"], x["layout"], x["kind"]) for x in loras] == [
        ("style", "diffusers", "lora"),
        ("blocks", "peft", "lora"),
    ]


def test_requests_opt_in_and_match_the_python_api(server, pipe):
    api = server.openai()
    loras = [{"name": "style", "scale": 0.7}, {"name": "blocks", "scale": -0.4}]
    got = api.images.generate(prompt=PROMPT, extra_body={"seed": 3, "loras": loras})
    expected = pipe.generate(PROMPT, seed=3, loras={"style": 0.7, "blocks": -0.4}).images[0]
    assert np.array_equal(picture(base64.b64decode(got.data[0].b64_json)), np.asarray(expected))
    plain = api.images.generate(prompt=PROMPT, extra_body={"seed": 3})
    base = pipe.generate(PROMPT, seed=3).images[0]
    assert np.array_equal(picture(base64.b64decode(plain.data[0].b64_json)), np.asarray(base))
    assert not np.array_equal(np.asarray(base), np.asarray(expected))
    with server.http() as client:
        job = client.post("/v1/jobs", json={"prompt": PROMPT, "seed": 4, "loras": [{"name": "style"}]}).json()
        done = wait_status(client, job["id"], ("succeeded",))
        assert done["result"]["info"]["loras"] == {"style": 1.0}
        edit = client.post(
            "/v1/images/edits",
            data={"prompt": PROMPT, "strength": "0.6", "seed": "5", "loras": json.dumps([{"name": "style"}])},
            files={"image": ("a.png", png(), "image/png")},
        )
    assert edit.status_code == 200, edit.text
    init = pil_image(png())
    expected_edit = pipe.generate(PROMPT, init_image=init, strength=0.6, seed=5, loras={"style": 1.0})
    assert np.array_equal(image(edit.json()["data"][0]), np.asarray(expected_edit.images[0]))


def pil_image(data: bytes):
    import io

    import PIL.Image

    return PIL.Image.open(io.BytesIO(data))


@pytest.mark.parametrize(
    "loras,status,message",
    [
        ([{"name": "nope"}], 400, "loras: no LoRA named 'nope' is loaded (loaded: 'style', 'blocks')"),
        ([{"name": "style"}, {"name": "style", "scale": 2}], 400, "'style' is given twice"),
        ([{"name": "style", "weight": 1}], 422, "weight"),
        ({"style": 1}, 422, "loras"),
    ],
)
def test_bad_loras_are_refused_before_queueing(server, loras, status, message):
    with server.http() as client:
        r = client.post("/v1/jobs", json={"prompt": PROMPT, "loras": loras})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"] or message in json.dumps(r.json())
    if status == 400:
        assert r.json()["error"]["param"] == "loras"


def test_generate_with_lora_on_the_command_line(files, pipe, tmp_path, capsys):
    out = tmp_path / "cli.png"
    code = cli.main(["generate", PROMPT, "--seed", "2", "--lora", f"{files[0]}:0.5", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    expected = pipe.generate(PROMPT, seed=2, loras={"style": 0.5}).images[0]
    assert np.array_equal(np.asarray(pil_image(out.read_bytes())), np.asarray(expected))


def test_a_lora_for_another_model_is_one_error_line(tmp_path, capsys):
    from test_lora import flux1_kohya

    other = tmp_path / "flux1.safetensors"
    save_file(flux1_kohya(), other)
    assert cli.main(["generate", PROMPT, "--lora", str(other)]) == 1
    err = capsys.readouterr().err
    assert "fluxforge: error: 0 of the 12 keys of this LoRA file match" in err and "FLUX.1" in err
    assert cli.main(["generate", PROMPT, "--lora", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
