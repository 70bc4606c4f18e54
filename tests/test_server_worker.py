"""The server's parts in process: validation without the model, limits as the Python API's rules, images
refused from their header, cancel releasing the job's tensors, previews that look like the result."""

from __future__ import annotations

import io
import threading
import time
import weakref

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from serving import header_only_png

import fluxforge as ff
from fluxforge.errors import InputTooLarge
from fluxforge.preview import Previewer
from fluxforge.request import GenerationRequest, Limits, param_of
from fluxforge.server import Settings, create_app
from fluxforge.server.protocol import JobBody, job_submission

PROMPT = "a red circle on a blue background, top left"


@pytest.fixture(scope="module")
def pipe():
    return ff.Pipeline.from_pretrained()


def test_validate_runs_no_network(pipe, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("validation ran a network")

    for module in (pipe.transformer, pipe.vae, pipe.components.text_encoder):
        monkeypatch.setattr(module, "forward", forbidden)
    monkeypatch.setattr(pipe.vae, "encode", forbidden)
    plan = pipe.validate(GenerationRequest(PROMPT, references=[np.zeros((64, 96, 3), np.uint8)], seed=1))
    assert (plan.mode, plan.width, plan.height, plan.seeds) == ("references", 96, 64, [1])
    with pytest.raises(ValueError, match="strength= needs init_image=") as info:
        pipe.validate(GenerationRequest(PROMPT, strength=0.5))
    assert param_of(info.value) == "strength"


def test_limits_are_the_rules_of_the_pipeline(pipe):
    small = ff.Pipeline(pipe.components)
    small.limits = Limits(max_references=1, max_images=2, max_prompt_chars=10, max_input_pixels=1000)
    ref = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="references: 2 given; at most 1") as info:
        small.generate(PROMPT[:5], references=[ref, ref])
    assert param_of(info.value) == "references"
    with pytest.raises(ValueError, match=r"num_images must be in \[1, 2\]"):
        small.generate(PROMPT[:5], num_images=3)
    with pytest.raises(InputTooLarge, match="prompt has 43 characters; at most 10"):
        small.generate(PROMPT)
    with pytest.raises(InputTooLarge, match=r"references\[0\] is 64x64"):
        small.generate(PROMPT[:5], references=[ref])


def test_images_are_measured_before_they_are_decoded(pipe, monkeypatch):
    def no_decoding(self, *args, **kwargs):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(InputTooLarge, match=r"init_image is 12000x12000 = 144.0 MP"):
        pipe.validate(GenerationRequest(PROMPT, init_image=header_only_png(12000, 12000), strength=0.5))
    # Far above Pillow's own bomb limit: refused as a bomb, still undecoded.
    with pytest.raises(InputTooLarge, match="decompression bomb"):
        pipe.validate(GenerationRequest(PROMPT, references=[header_only_png(40000, 40000)]))


def test_job_body_takes_the_python_names_and_teaches_the_rest():
    sub = job_submission(JobBody(prompt="x", references=["aGk="], strength=None))
    assert sub.inputs == {"references": [b"hi"]} and sub.mode == "references"
    with pytest.raises(TypeError, match="an input image is either references"):
        job_submission(JobBody(prompt="x", image="aGk="))
    with pytest.raises(TypeError, match="did you mean 'num_images'"):
        job_submission(JobBody(prompt="x", num_image=2))


def test_cancel_stops_at_the_next_step_and_releases_the_tensors(pipe, tmp_path):
    refs: list[weakref.ref] = []
    steps_seen = []
    original = pipe.run_batch

    def watched(requests, on_step=None, cancel=None):
        def spy(info):
            steps_seen.append(info.step)
            refs.extend(weakref.ref(t) for t in (info.latents, info.denoised))
            on_step(info)

        return original(requests, on_step=spy, cancel=cancel)

    pipe.run_batch = watched
    try:
        app = create_app(Settings(data=tmp_path / "data", max_queue=4), load=lambda: pipe)
        service = app.state.service
        service.start()
        deadline = time.monotonic() + 30
        while service.worker.state != "ready" and time.monotonic() < deadline:
            time.sleep(0.01)
        job, _ = service.admit(job_submission(JobBody(prompt=PROMPT, steps=400, seed=0)))
        while len(steps_seen) < 3:
            time.sleep(0.005)
        service.cancel(job.id)
        while not service.store.get(job.id).final:
            time.sleep(0.005)
        final = service.store.get(job.id)
        assert final.status == "canceled" and len(steps_seen) < 400
        # The worker finished the job: nothing of it is left alive, without the test collecting garbage.
        alive = [r for r in refs if r() is not None]
        assert not alive, f"{len(alive)} of {len(refs)} step tensors still referenced"
        service.stop()
    finally:
        pipe.run_batch = original


def test_previews_look_like_the_result(pipe):
    previewer = Previewer.fit(pipe.vae)
    seen = {}
    result = pipe.generate(PROMPT, seed=0, on_step=lambda info: seen.update(last=info.denoised))
    grid = pipe.pixels_per_token
    preview = previewer.pixels(seen["last"], 64 // grid, 64 // grid)
    target = F.avg_pool2d(result.pixels.float(), pipe.vae.config.spatial_scale)
    assert preview.shape == target.shape == (1, 3, 16, 16)
    # A linear map cannot match the decoder; on the demo's 4-channel VAE it follows it (measured 0.88).
    correlation = torch.corrcoef(torch.stack([preview.flatten(), target.flatten()]))[0, 1]
    assert correlation > 0.75
    jpeg = previewer.jpeg(seen["last"], 8, 8)
    assert PIL.Image.open(io.BytesIO(jpeg)).size == (16, 16)


def test_worker_survives_a_failing_job(pipe, tmp_path, monkeypatch):
    app = create_app(Settings(data=tmp_path / "data"), load=lambda: pipe)
    service = app.state.service
    service.start()
    while service.worker.state != "ready":
        time.sleep(0.01)
    calls = threading.Event()
    original = pipe.run_batch

    def oom_once(requests, on_step=None, cancel=None):
        if not calls.is_set():
            calls.set()
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(requests, on_step=on_step, cancel=cancel)

    monkeypatch.setattr(pipe, "run_batch", oom_once)
    first, _ = service.admit(job_submission(JobBody(prompt=PROMPT, steps=2)))
    second, _ = service.admit(job_submission(JobBody(prompt=PROMPT, steps=2)))
    for job in (first, second):
        while not service.store.get(job.id).final:
            time.sleep(0.01)
    assert service.store.get(first.id).error["code"] == "out_of_memory"
    assert service.store.get(second.id).status == "succeeded"
    service.stop()


def _ready(service):
    service.start()
    deadline = time.monotonic() + 30
    while service.worker.state != "ready" and time.monotonic() < deadline:
        time.sleep(0.01)


def test_retention_deletes_finished_jobs_and_their_files(pipe, tmp_path):
    app = create_app(Settings(data=tmp_path / "data", retention=3600), load=lambda: pipe)
    service = app.state.service
    _ready(service)
    job, _ = service.admit(job_submission(JobBody(prompt=PROMPT, steps=2)))
    while not service.store.get(job.id).final:
        time.sleep(0.01)
    folder = service.store.folder(job.id)
    assert sorted(p.name for p in folder.iterdir()) == ["out-0.png"]
    assert service.clean() == []  # younger than the retention
    assert service.clean(now=time.time() + 3601) == [job.id]
    assert service.store.get(job.id) is None and not folder.exists()
    service.stop()


def test_503_while_the_model_loads(pipe, tmp_path):
    from fastapi.testclient import TestClient

    loaded = threading.Event()

    def slow_load():
        loaded.wait(30)
        return pipe

    app = create_app(Settings(data=tmp_path / "data"), load=slow_load)
    with TestClient(app) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "starting"
        busy = client.post("/v1/jobs", json={"prompt": PROMPT})
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "loading"
        assert int(busy.headers["Retry-After"]) >= 1
        loaded.set()
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.post("/v1/jobs", json={"prompt": PROMPT, "steps": 1}).status_code == 202


def test_preview_map_is_the_linear_map_on_denormalized_latents(pipe):
    from fluxforge.model.autoencoder import unpack, unpatchify

    previewer = Previewer.fit(pipe.vae)
    tokens = torch.randn(2, 6 * 4, pipe.transformer.config.in_channels)
    z = unpatchify(pipe.vae.denormalize(unpack(tokens, 6, 4)), pipe.vae.config.patch_size)
    direct = torch.einsum("bchw,ck->bkhw", z, previewer.weight) + previewer.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(previewer.pixels(tokens, 6, 4), direct.clamp(-1, 1), atol=1e-5, rtol=0)


def _wait_final(service, job_ids, timeout=120):
    deadline = time.monotonic() + timeout
    while not all(service.store.get(j).final for j in job_ids):
        assert time.monotonic() < deadline, "jobs did not finish"
        time.sleep(0.01)
    return [service.store.get(j) for j in job_ids]


def _blocked_service(pipe, tmp_path, max_batch):
    app = create_app(Settings(data=tmp_path / "data", max_queue=16, max_batch=max_batch), load=lambda: pipe)
    service = app.state.service
    _ready(service)
    blocker, _ = service.admit(job_submission(JobBody(prompt=PROMPT, steps=400, seed=0)))
    while service.store.get(blocker.id).status != "running":
        time.sleep(0.005)
    return service, blocker


def test_waiting_compatible_jobs_run_as_one_batch_with_their_solo_images(pipe, tmp_path):
    service, blocker = _blocked_service(pipe, tmp_path, max_batch=8)
    prompts = [
        PROMPT,
        "a yellow star on a green background, center",
        "a white square on a black background",
    ] * 2
    seeds = [10 + i for i in range(len(prompts))]
    same = [
        service.admit(job_submission(JobBody(prompt=p, steps=3, seed=s)))[0]
        for p, s in zip(prompts, seeds, strict=True)
    ]
    other, _ = service.admit(job_submission(JobBody(prompt=PROMPT, steps=4, seed=1)))  # another shape: alone
    service.cancel(blocker.id)
    done = _wait_final(service, [j.id for j in [*same, other]])
    assert all(j.status == "succeeded" for j in done), [j.error for j in done]
    # 6 jobs of one image each: more than --max-n (4) together, which limits requests, not batches.
    assert [j.result["info"].get("batch_size") for j in done] == [6] * 6 + [None]
    for job, prompt, seed in zip(done[:6], prompts, seeds, strict=True):
        assert job.result["info"]["prompt"] == prompt and job.result["images"][0]["seed"] == seed
        got = np.asarray(PIL.Image.open(service.store.folder(job.id) / job.result["images"][0]["file"]))
        alone = np.asarray(pipe.generate(prompt, seed=seed, steps=3).images[0])
        # its own noise and prompt; batched as alone (test_batching.py): measured equal, allowed 1 level
        assert np.abs(got.astype(int) - alone.astype(int)).max() <= 1
    service.stop()


def test_jobs_with_different_images_of_the_same_sizes_batch_in_every_mode(pipe, tmp_path):
    """Jobs with the same settings and images of the same sizes run together, whatever the images hold, each
    with its solo image; a reference of another size, another mode: apart."""
    from serving import png

    service, blocker = _blocked_service(pipe, tmp_path, max_batch=8)
    colours = [(200, 30, 30), (30, 30, 200), (20, 160, 60)]
    refs = [png((64, 64), c) for c in colours]
    inits = [png((64, 64), c[::-1]) for c in colours]
    masks = []
    for i in range(3):
        mask = np.zeros((64, 64, 4), np.uint8)
        mask[..., 3] = 255
        mask[8 * i : 32 + 8 * i, 16:48, 3] = 0  # OpenAI's convention here: alpha 0 repaints
        buffer = io.BytesIO()
        PIL.Image.fromarray(mask).save(buffer, format="PNG")
        masks.append(buffer.getvalue())
    b64 = lambda data: "data:image/png;base64," + __import__("base64").b64encode(data).decode()  # noqa: E731
    prompts = [PROMPT, "a yellow star on a green background, center", "a white square on a black background"]
    cases = {
        "references": lambda i: dict(references=[b64(refs[i])]),
        "img2img": lambda i: dict(init_image=b64(inits[i]), strength=0.6),
        "inpaint": lambda i: dict(
            init_image=b64(inits[i]), mask=b64(masks[i]), mask_alpha_is_repaint=True, strength=0.8
        ),
    }
    jobs = {}
    for mode, extra in cases.items():
        jobs[mode] = [
            service.admit(job_submission(JobBody(prompt=p, steps=3, seed=20 + i, **extra(i))))[0]
            for i, p in enumerate(prompts)
        ]
    other_size = png((64, 48), colours[0])
    alone, _ = service.admit(
        job_submission(JobBody(prompt=PROMPT, steps=3, seed=5, references=[b64(other_size)]))
    )
    service.cancel(blocker.id)
    ids = [j.id for js in jobs.values() for j in js] + [alone.id]
    done = {j.id: j for j in _wait_final(service, ids)}
    assert all(j.status == "succeeded" for j in done.values()), [j.error for j in done.values()]
    assert done[alone.id].result["info"].get("batch_size") is None
    opened = lambda data: PIL.Image.open(io.BytesIO(data))  # noqa: E731
    for mode, js in jobs.items():
        assert [done[j.id].result["info"].get("batch_size") for j in js] == [3, 3, 3], mode
        for i, job in enumerate(js):
            job = done[job.id]
            got = np.asarray(PIL.Image.open(service.store.folder(job.id) / job.result["images"][0]["file"]))
            kwargs = {"references": [opened(refs[i])] if mode == "references" else []}
            if mode != "references":
                kwargs.update(init_image=opened(inits[i]), strength=0.6 if mode == "img2img" else 0.8)
            if mode == "inpaint":
                kwargs.update(mask=opened(masks[i]), mask_alpha_is_repaint=True)
            solo = np.asarray(pipe.generate(prompts[i], seed=20 + i, steps=3, **kwargs).images[0])
            assert job.result["info"]["mode"] == mode
            # batched as alone (tests/test_batching.py): measured equal; allowed 1 level of 255
            assert np.abs(got.astype(int) - solo.astype(int)).max() <= 1, mode
    service.stop()


def test_cancel_in_a_batch_stops_it_and_requeues_the_others(pipe, tmp_path):
    service, blocker = _blocked_service(pipe, tmp_path, max_batch=4)
    jobs = [service.admit(job_submission(JobBody(prompt=PROMPT, steps=300, seed=i)))[0] for i in range(3)]
    service.cancel(blocker.id)
    while not all(service.store.get(j.id).status == "running" for j in jobs):
        time.sleep(0.005)
    service.cancel(jobs[1].id)
    done = _wait_final(service, [j.id for j in jobs])
    assert [j.status for j in done] == ["succeeded", "canceled", "succeeded"]
    assert [j.attempts for j in done] == [1, 1, 1]  # the interrupted companions' first run is not counted
    assert done[0].result["info"]["batch_size"] == 2
    service.stop()
