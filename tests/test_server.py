"""`fluxforge serve` over real HTTP on loopback, started as a subprocess with the demo model: the official
openai client for the OpenAI endpoints, httpx for the rest. Images are compared with the Python API's."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading

import numpy as np
import openai
import pytest
from serving import PROMPT, Server, WebhookReceiver, events, header_only_png, picture, png, wait_status

import fluxforge as ff

LONG = 400  # steps: a demo job of a few seconds, to cancel or queue behind


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(
        tmp_path_factory.mktemp("serve") / "data", "--webhook-secret", "s3cret", "--sse-keepalive", "1"
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with server.http() as c:
        yield c


@pytest.fixture(scope="module")
def pipe():
    return ff.Pipeline.from_pretrained()


def _long_job(client, **extra):
    response = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": LONG, "seed": 1, **extra})
    assert response.status_code == 202, response.text
    return response.json()


def _cancel_and_wait(client, job_id):
    client.post(f"/v1/jobs/{job_id}/cancel")
    return wait_status(client, job_id, ("canceled", "succeeded", "failed"))


# ------------------------------------------------------------------------------------------------------
# Service endpoints


def test_health_models_capabilities_metrics(server, client):
    health = client.get("/health").json()
    assert health["status"] in ("ready", "busy") and health["model"] == "fluxforge-demo"
    models = server.openai().models.list()
    assert [m.id for m in models.data] == ["fluxforge-demo"]
    assert server.openai().models.retrieve("fluxforge-demo").id == "fluxforge-demo"
    caps = client.get("/v1/capabilities").json()
    assert caps["modes"] == ["text-to-image", "references", "img2img", "inpaint"]
    assert caps["limits"]["max_n"] == 4 and caps["limits"]["max_queue"] == 16
    assert caps["defaults"] == {"steps": 12, "guidance": 4.0, "width": 64, "height": 64}
    assert caps["guidance"] and caps["negative_prompt"] and not caps["reference_kv"]
    assert caps["caches"]["prompts"]["max_bytes"] == 256 * 2**20
    for _ in range(2):
        client.post("/v1/images/generations", json={"prompt": PROMPT, "steps": 2})
    text = client.get("/metrics").text
    hits = next(
        line for line in text.splitlines() if line.startswith('fluxforge_cache_hits_total{cache="prompts"}')
    )
    assert int(hits.split()[-1]) >= 2  # the second request's prompt and negative prompt
    assert 'fluxforge_jobs{status="succeeded"}' in text and "fluxforge_step_seconds_count" in text
    assert "fluxforge_queue_length 0" in text


# ------------------------------------------------------------------------------------------------------
# OpenAI-compatible


def test_generate_matches_the_python_api(server, pipe):
    api = server.openai()
    result = api.images.generate(prompt=PROMPT, extra_body={"seed": 3})
    expected = pipe.generate(PROMPT, seed=3).images[0]
    assert np.array_equal(picture(base64.b64decode(result.data[0].b64_json)), np.asarray(expected))
    assert result.data[0].model_extra["seed"] == 3
    assert result.model_extra["mode"] == "text-to-image" and result.size == "64x64"
    assert result.output_format == "png" and result.usage.output_tokens == 64  # (64 / 8) ** 2 tokens


def test_n_gives_one_seed_per_image_and_urls(server, client, pipe):
    result = server.openai().images.generate(
        prompt=PROMPT, n=3, response_format="url", extra_body={"seed": 10, "steps": 4}
    )
    assert [d.model_extra["seed"] for d in result.data] == [10, 11, 12]
    batch = pipe.generate(PROMPT, seed=10, steps=4, num_images=3).images
    for d, expected in zip(result.data, batch, strict=True):
        assert d.url.startswith(server.url + "/v1/jobs/")
        got = client.get(d.url)
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert np.array_equal(picture(got.content), np.asarray(expected))
        # Each image alone from its seed: the same picture, up to the fp32 rounding of a batch of 1 vs 3
        # (latents within 1e-5, measured: at most 1 level of 255).
        alone = pipe.generate(PROMPT, seed=d.model_extra["seed"], steps=4).images[0]
        assert np.abs(picture(got.content).astype(int) - np.asarray(alone).astype(int)).max() <= 2


def test_size_and_output_format(server):
    result = server.openai().images.generate(
        prompt=PROMPT, size="128x96", output_format="jpeg", extra_body={"steps": 2, "seed": 0}
    )
    data = base64.b64decode(result.data[0].b64_json)
    assert data[:3] == b"\xff\xd8\xff" and picture(data).shape == (96, 128, 3)
    assert result.size == "128x96"


def test_edits_in_each_mode_match_the_python_api(server, pipe):
    api = server.openai()
    red, blue = png(color=(220, 20, 20)), png(color=(20, 20, 220))
    mask = png(mode="RGBA", color=(0, 0, 0, 255))
    hole = bytearray()
    import io

    import PIL.Image

    m = PIL.Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    m.paste((0, 0, 0, 0), (16, 16, 48, 48))  # alpha 0: repaint
    buffer = io.BytesIO()
    m.save(buffer, format="PNG")
    mask = buffer.getvalue()
    del hole
    prompt = "the same shape in green"

    refs = api.images.edit(image=[("a.png", red), ("b.png", blue)], prompt=prompt, extra_body={"seed": 5})
    assert refs.model_extra["mode"] == "references"
    expected = pipe.generate(prompt, references=[red, blue], seed=5).images[0]
    assert np.array_equal(picture(base64.b64decode(refs.data[0].b64_json)), np.asarray(expected))

    img2img = api.images.edit(image=("a.png", red), prompt=prompt, extra_body={"seed": 5, "strength": 0.6})
    assert img2img.model_extra["mode"] == "img2img"
    expected = pipe.generate(prompt, init_image=red, strength=0.6, seed=5).images[0]
    assert np.array_equal(picture(base64.b64decode(img2img.data[0].b64_json)), np.asarray(expected))

    inpaint = api.images.edit(
        image=[("a.png", red), ("b.png", blue)], mask=("m.png", mask), prompt=prompt, extra_body={"seed": 5}
    )
    assert inpaint.model_extra["mode"] == "inpaint"
    expected = pipe.generate(
        prompt, init_image=red, mask=mask, mask_alpha_is_repaint=True, references=[blue], seed=5
    ).images[0]
    assert np.array_equal(picture(base64.b64decode(inpaint.data[0].b64_json)), np.asarray(expected))


def test_streaming_partial_images(server):
    stream = server.openai().images.generate(
        prompt=PROMPT, stream=True, partial_images=2, extra_body={"seed": 0, "steps": 6}
    )
    kinds = [(e.type, getattr(e, "partial_image_index", None)) for e in stream]
    assert kinds == [
        ("image_generation.partial_image", 0),
        ("image_generation.partial_image", 1),
        ("image_generation.completed", None),
    ]
    stream = server.openai().images.edit(
        image=("a.png", png()),
        prompt="the same shape in green",
        stream=True,
        partial_images=1,
        extra_body={"steps": 3},
    )
    assert [e.type for e in stream] == ["image_edit.partial_image", "image_edit.completed"]


def test_a_stream_that_waits_in_the_queue_still_parses(server, client):
    blocker = _long_job(client)
    wait_status(client, blocker["id"], ("running",))
    threading.Timer(2.5, lambda: client.post(f"/v1/jobs/{blocker['id']}/cancel")).start()  # > --sse-keepalive
    stream = server.openai().images.generate(
        prompt=PROMPT, stream=True, partial_images=1, extra_body={"steps": 2}
    )
    assert [e.type for e in stream] == ["image_generation.partial_image", "image_generation.completed"]


# ------------------------------------------------------------------------------------------------------
# Errors: the OpenAI body, the Python API's message, the endpoint's parameter name


def _error(response, status, code=None, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def test_400_with_the_python_message_and_the_endpoint_names(server, client):
    api = server.openai()
    with pytest.raises(openai.BadRequestError) as info:
        api.images.generate(prompt=PROMPT, n=9)
    assert info.value.body["param"] == "n" and "n must be in [1, 4], got 9" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        api.images.generate(prompt=PROMPT, size="16x16")
    assert info.value.body["param"] == "size" and "too small" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        api.images.generate(prompt=PROMPT, model="dall-e-3")
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        api.images.edit(image=[("a.png", png()), ("b.png", png(size=(8, 8)))], prompt="x")
    assert info.value.body["param"] == "image[1]" and info.value.body["message"].startswith("image[1] is 8x8")
    with pytest.raises(openai.BadRequestError) as info:
        api.images.edit(image=("a.png", b"not an image"), prompt="x", extra_body={"strength": 0.5})
    assert info.value.body["param"] == "image"

    err = _error(
        client.post("/v1/jobs", json={"prompt": PROMPT, "strength": 0.5}), 400, "invalid_value", "strength"
    )
    assert err["message"].startswith("strength= needs init_image=")  # the Python API's own words
    err = _error(client.post("/v1/jobs", json={"prompt": PROMPT, "image": "x"}), 400, param=None)
    assert "references=[...]" in err["message"]
    _error(
        client.post("/v1/jobs", json={"prompt": PROMPT, "references": ["%%%"]}), 400, param="references[0]"
    )
    _error(client.post("/v1/jobs", json={"prompt": PROMPT, "guidance": 40}), 400, param="guidance")
    _error(client.post("/v1/jobs", json={"prompt": PROMPT, "webhook_url": "ftp://x"}), 400, param=None)


def test_422_for_bodies_that_do_not_parse(client):
    error = _error(
        client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}), 422
    )
    assert error["param"] is None and error["message"].startswith("the body is not valid JSON (at character")
    _error(client.post("/v1/jobs", json={"prompt": PROMPT, "steps": "many"}), 422, "invalid_body", "steps")
    _error(client.post("/v1/images/generations", json={"n": 1}), 422, param="prompt")
    _error(
        client.post("/v1/images/edits", data={"prompt": "x", "n": "two"}, files={"image": png()}),
        422,
        param="n",
    )


def test_413_body_and_pixels_before_decoding(server, client):
    big = {"prompt": PROMPT, "references": ["A" * (33 * 2**20)]}
    _error(client.post("/v1/jobs", json=big), 413, "too_large")
    # A PNG that claims 20000 x 20000 pixels in 33 bytes: refused from its header, never decoded.
    bomb = base64.b64encode(header_only_png(20000, 20000)).decode()
    err = _error(client.post("/v1/jobs", json={"prompt": PROMPT, "references": [bomb]}), 413, "too_large")
    assert err["param"] == "references[0]"
    _error(client.post("/v1/jobs", json={"prompt": "x" * 20_001}), 413, param="prompt")


def test_404_409_and_unknown_routes(client):
    _error(client.get("/v1/jobs/job_nope"), 404, "job_not_found")
    _error(client.post("/v1/jobs/job_nope/cancel"), 404)
    _error(client.get("/v1/nothing"), 404, "not_found")
    job = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": 2}).json()
    done = wait_status(client, job["id"], ("succeeded",))
    _error(client.post(f"/v1/jobs/{job['id']}/cancel"), 409, "job_finished")
    _error(client.get(f"/v1/jobs/{job['id']}/images/5"), 404, "image_not_found")
    assert client.get(done["result"]["images"][0]["url"]).status_code == 200
    assert client.delete(f"/v1/jobs/{job['id']}").json()["deleted"]
    _error(client.get(f"/v1/jobs/{job['id']}"), 404)


def test_401_429_and_503(tmp_path):
    s = Server(tmp_path / "data", "--api-key", "k3y", "--max-queue", "1", "--grace", "0")
    try:
        api = s.openai()
        with pytest.raises(openai.AuthenticationError):
            api.images.generate(prompt=PROMPT)
        with s.http() as anon:
            _error(anon.get("/v1/jobs"), 401, "invalid_api_key")
            _error(anon.get("/metrics"), 401)
            assert anon.get("/health").status_code == 200  # not guarded
        with s.http(headers={"Authorization": "Bearer k3y"}) as c:
            assert s.openai("k3y").models.list().data[0].id == "fluxforge-demo"
            running = _long_job(c)
            wait_status(c, running["id"], ("running",))
            queued = _long_job(c)
            full = c.post("/v1/jobs", json={"prompt": PROMPT})
            _error(full, 429, "queue_full")
            assert int(full.headers["Retry-After"]) >= 1
            with pytest.raises(openai.RateLimitError):
                s.openai("k3y").images.generate(prompt=PROMPT)
            s.process.send_signal(15)  # SIGTERM: no new jobs while draining
            for _ in range(100):
                if c.get("/health").status_code == 503:
                    break
            _error(c.post("/v1/jobs", json={"prompt": PROMPT}), 503, "shutting_down")
            assert queued["status"] == "queued"
        assert s.process.wait(60) == 0
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------------------
# Jobs: events, cancel, idempotency, webhooks


def test_sse_event_order_and_resume(client):
    blocker = _long_job(client)
    wait_status(client, blocker["id"], ("running",))
    ahead = _long_job(client)
    job = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": 5, "seed": 2}).json()
    assert job["status"] == "queued" and job["queue_position"] == 1
    received = []

    def listen():
        with client.stream("GET", job["urls"]["events"]) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            received.extend(events(response))

    listener = threading.Thread(target=listen)
    listener.start()
    import time

    time.sleep(0.5)
    _cancel_and_wait(client, ahead["id"])  # the job moves up the queue
    _cancel_and_wait(client, blocker["id"])
    listener.join(60)
    names = [name for name, _, _ in received]
    assert names[0] == "state" and received[0][2]["job"]["status"] == "queued"
    assert names[1:3] == ["queued", "started"] and received[1][2]["queue_position"] == 0
    steps = [d["step"] for n, _, d in received if n == "progress"]
    assert steps == [1, 2, 3, 4, 5]
    assert names[-1] == "completed" and received[-1][2]["result"]["images"][0]["seed"] == 2
    previews = [d for n, _, d in received if n == "preview"]
    assert len(previews) == 5 and picture(base64.b64decode(previews[0]["image"])).shape == (16, 16, 3)
    ids = [i for _, i, _ in received[1:]]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for name, _, data in received:
        assert data["type"] == name

    # Last-Event-ID: what came after it, from the history (previews: only the latest).
    started_id = received[2][1]
    with client.stream("GET", job["urls"]["events"], headers={"Last-Event-ID": str(started_id)}) as response:
        again = events(response)
    assert again[0][0] == "state"
    assert [d["step"] for n, _, d in again if n == "progress"] == [1, 2, 3, 4, 5]
    assert again[-1][0] == "completed"


def test_cancel_queued_and_running(client):
    running = _long_job(client)
    wait_status(client, running["id"], ("running",))
    queued = _long_job(client)
    response = client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert response.status_code == 202
    assert wait_status(client, queued["id"], ("canceled",))["started_at"] is None
    first = wait_status(client, running["id"], ("running",))
    while first["progress"]["step"] < 2:
        first = client.get(f"/v1/jobs/{running['id']}").json()
    client.post(f"/v1/jobs/{running['id']}/cancel")
    done = wait_status(client, running["id"], ("canceled",))
    assert 0 < done["progress"]["step"] < LONG and done["error"]["code"] == "canceled"
    assert done["result"] is None


def test_idempotency(client):
    body = {"prompt": PROMPT, "steps": 2, "seed": 4}
    first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc"})
    again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc"})
    assert first.status_code == 202 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    other = client.post("/v1/jobs", json={**body, "seed": 5}, headers={"Idempotency-Key": "abc"})
    _error(other, 422, "idempotency_key_reused")
    listed = client.get("/v1/jobs", params={"limit": 100}).json()["data"]
    assert sum(j["id"] == first.json()["id"] for j in listed) == 1


def test_webhook_is_signed(client):
    receiver = WebhookReceiver(fail_first=1)  # the first delivery fails: it is retried
    try:
        job = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": 2, "webhook_url": receiver.url}).json()
        wait_status(client, job["id"], ("succeeded",))
        receiver.wait(2)
        assert len(receiver.received) == 2
        signature, body = receiver.received[-1]
        expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
        assert signature == f"sha256={expected}"
        sent = json.loads(body)
        assert sent["id"] == job["id"] and sent["status"] == "succeeded"
        assert sent["result"]["images"][0]["url"].startswith("http://127.0.0.1:")
    finally:
        receiver.close()


def test_list_filters(client):
    job = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": 2}).json()
    wait_status(client, job["id"], ("succeeded",))
    succeeded = client.get("/v1/jobs", params={"status": "succeeded", "limit": 5}).json()["data"]
    assert succeeded[0]["id"] == job["id"] and all(j["status"] == "succeeded" for j in succeeded)
    _error(client.get("/v1/jobs", params={"status": "done"}), 400, param="status")


def test_a_client_that_disconnects_cancels_its_generation(client):
    import httpx

    with pytest.raises(httpx.ReadTimeout):
        client.post("/v1/images/generations", json={"prompt": PROMPT, "steps": LONG}, timeout=1.0)
    job = client.get("/v1/jobs", params={"limit": 1}).json()["data"][0]
    assert job["kind"] == "generation" and job["request"]["steps"] == LONG
    done = wait_status(client, job["id"], ("canceled", "succeeded"), timeout=30)
    assert done["status"] == "canceled" and done["progress"]["step"] < LONG


def test_keepalive_and_png_metadata(client):
    from fluxforge.images import read_png_metadata

    blocker = _long_job(client)
    wait_status(client, blocker["id"], ("running",))
    job = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": 3, "seed": 9}).json()
    lines = []
    with client.stream("GET", job["urls"]["events"]) as response:
        for line in response.iter_lines():
            lines.append(line)
            if line.startswith(": keep-alive"):  # every --sse-keepalive seconds (1 s here; 15 s by default)
                break
    assert lines[0] == "event: state"
    _cancel_and_wait(client, blocker["id"])
    done = wait_status(client, job["id"], ("succeeded",))
    image = client.get(done["result"]["images"][0]["url"]).content
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "out.png"
        path.write_bytes(image)
        metadata = read_png_metadata(path)
    assert metadata["prompt"] == PROMPT and metadata["seed"] == 9 and metadata["steps"] == 3
    assert metadata["mode"] == "text-to-image" and metadata["variant"] == "fluxforge-demo"


def test_413_for_a_chunked_body_over_the_limit(client):
    def chunks():
        for _ in range(40):
            yield b"x" * 2**20  # 40 MiB without a Content-Length

    response = client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    _error(response, 413, "too_large")
    assert client.get("/health").status_code == 200
