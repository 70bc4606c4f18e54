"""`fluxforge serve --ray` on a local Ray cluster started here (3 CPUs, the demo model, 2 model replicas),
over HTTP on loopback: the same endpoints and client code as tests/test_server.py, requests spread over
both replicas, progress and cancel through the replica, a replica killed mid-job losing nothing, and 429
from the ingress's bounded queue."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from serving import PROMPT, Server, picture, wait_status

ray = pytest.importorskip("ray", reason="Ray Serve is the optional extra fluxforge[ray]")

LONG = {"prompt": PROMPT, "steps": 1000, "width": 128, "height": 128}  # about 10-20 s on two CPU cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head on this machine, bounded to 3 CPUs (2 model replicas of 1 CPU, and room for Serve). A
    loopback test cluster without token auth: Ray turns it on once a token file exists in ~/.ray, which a
    developer's earlier local `ray.init()` leaves behind."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")  # this process, `ray start` and the server it starts
    ray_cli = shutil.which("ray", path=str(__import__("pathlib").Path(sys.executable).parent))
    port = free_port()
    start = [ray_cli, "start", "--head", f"--port={port}", "--num-cpus=3", "--num-gpus=0",
             "--include-dashboard=false", "--disable-usage-stats"]  # fmt: skip
    subprocess.run(start, check=True, capture_output=True, timeout=120)
    address = f"127.0.0.1:{port}"
    ray.init(address=address, logging_level="ERROR")
    yield address
    ray.shutdown()
    subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120)
    mp.undo()


@pytest.fixture(scope="module")
def server(cluster, tmp_path_factory):
    data = tmp_path_factory.mktemp("ray") / "data"
    s = Server(data, "--ray", "--replicas", "2", "--ray-address", cluster, "--max-queue", "4")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with server.http() as c:
        yield c


def live_events(response):
    """(event, data) as each SSE record arrives (tests/serving.events reads the stream to its end)."""
    name, data = None, []
    for line in response.iter_lines():
        if line == "" and name is not None:
            yield name, json.loads("\n".join(data)) if data else {}
            name, data = None, []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def replicas() -> list[dict]:
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if "#model#" in a["name"]]


def submit(client, **body) -> str:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait_running(client, job_id: str, steps: int = 1, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job["progress"]["step"] >= steps:
            return
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not start: {job}")


SOLO = """
import sys, numpy as np, torch
torch.set_num_threads(1)  # as each replica does, before it loads the model
import fluxforge as ff
pipe = ff.Pipeline.from_pretrained()
images = [np.asarray(pipe.generate(sys.argv[2], seed=int(s)).images[0]) for s in sys.argv[3:]]
np.save(sys.argv[1], np.stack(images))
"""


def solo(tmp_path, prompt: str, *seeds: int) -> np.ndarray:
    """The images a replica computes (one thread, as one CPU each), computed in a process of its own: on
    some CPUs (Intel MKL's AVX2 kernels) a product's rounding depends on the thread count, and even on a
    torch.set_num_threads call in the process's past, so this process must not change its own."""
    out = tmp_path / "solo.npy"
    subprocess.run([sys.executable, "-c", SOLO, str(out), prompt, *map(str, seeds)], check=True, timeout=300)
    return np.load(out)


def test_openai_and_job_endpoints_work_unchanged(server, client, tmp_path):
    expected = solo(tmp_path, PROMPT, 3, 4)
    result = server.openai().images.generate(prompt=PROMPT, extra_body={"seed": 3})
    assert np.array_equal(picture(base64.b64decode(result.data[0].b64_json)), expected[0])
    assert result.model_extra["mode"] == "text-to-image"
    job = wait_status(client, submit(client, prompt=PROMPT, seed=4), ("succeeded",))
    image = client.get(job["result"]["images"][0]["url"].replace(server.url, ""))
    assert np.array_equal(picture(image.content), expected[1])
    capabilities = client.get("/v1/capabilities").json()
    assert capabilities["model"] == "fluxforge-demo" and capabilities["limits"]["max_queue"] == 4
    assert client.post("/v1/jobs", json={"prompt": PROMPT, "steps": 0}).json()["error"]["param"] == "steps"


def prompt_lookups(client) -> dict[str, int]:
    """/metrics' prompt-cache hits + misses, per replica label."""
    counts: dict[str, int] = {}
    for line in client.get("/metrics").text.splitlines():
        lookup = line.startswith(("fluxforge_cache_hits_total", "fluxforge_cache_misses_total"))
        if lookup and 'cache="prompts"' in line:
            labels, value = line.split("{", 1)[1].split("} ")
            replica = dict(pair.split("=") for pair in labels.split(","))["replica"].strip('"')
            counts[replica] = counts.get(replica, 0) + int(value)
    return counts


def test_requests_are_spread_over_both_replicas_and_each_ones_caches_are_counted(client):
    before = prompt_lookups(client)
    ids = [submit(client, prompt=PROMPT, seed=i, steps=60) for i in range(4)]
    done = [wait_status(client, job_id, ("succeeded",)) for job_id in ids]
    used = [job["result"]["info"]["replica"] for job in done]
    assert len(set(used)) == 2 and set(used) <= {r["name"].rsplit("#", 1)[1] for r in replicas()}
    # each job's lookups (its result's counters) are counted in the caches of the replica that ran it
    expected = dict.fromkeys(used, 0)
    for job in done:
        call = job["result"]["info"]["cache"]["prompts"]
        expected[job["result"]["info"]["replica"]] += call["hits"] + call["misses"]
    after = prompt_lookups(client)
    assert {r: after[r] - before.get(r, 0) for r in expected} == expected and min(expected.values()) > 0
    prompts = client.get("/v1/capabilities").json()["caches"]["prompts"]  # the replicas' sums
    assert prompts["hits"] + prompts["misses"] == sum(after.values())


def test_progress_streams_from_the_replica_and_cancel_reaches_it(client):
    job_id = submit(client, **LONG, seed=1)
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        seen = []
        for kind, data in live_events(response):
            seen.append(kind)
            if kind == "progress" and data["step"] >= 3:
                assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
            if kind in ("canceled", "completed", "failed"):
                break
    assert "preview" in seen and seen[-1] == "canceled"
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "canceled" and job["progress"]["step"] < 1000
    # the replica is free again: a short job runs at once
    wait_status(client, submit(client, prompt=PROMPT, seed=5, steps=4), ("succeeded",), timeout=60)


def test_killing_a_replica_mid_job_loses_nothing(client):
    ids = [submit(client, **LONG, seed=s) for s in (11, 12)]
    for job_id in ids:
        wait_running(client, job_id, steps=5)
    victim = replicas()[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=False)
    done = [wait_status(client, job_id, ("succeeded", "failed"), timeout=240) for job_id in ids]
    assert [job["status"] for job in done] == ["succeeded", "succeeded"], done
    assert sorted(job["attempts"] for job in done) == [1, 2]  # the killed one ran again, once
    time.sleep(2.5)  # past the ingress's reuse of the facts it last saw: /metrics forgets the dead replica
    client.get("/metrics")
    counted = set(prompt_lookups(client))
    assert victim["name"].rsplit("#", 1)[1] not in counted
    assert counted and counted <= {r["name"].rsplit("#", 1)[1] for r in replicas()}


def test_a_full_queue_answers_429(client):
    running = [submit(client, **LONG, seed=20 + i) for i in range(2)]
    for job_id in running:
        wait_running(client, job_id)
    queued = [submit(client, **LONG, seed=30 + i) for i in range(4)]
    over = client.post("/v1/jobs", json={**LONG, "seed": 40})
    assert over.status_code == 429 and over.headers["Retry-After"]
    assert over.json()["error"]["code"] == "queue_full"
    for job_id in queued + running:  # queued jobs can be canceled: they never reach a replica
        client.post(f"/v1/jobs/{job_id}/cancel")
    for job_id in queued:
        assert wait_status(client, job_id, ("canceled",), timeout=60)["attempts"] == 0


def test_the_application_for_serve_run_and_config_files():
    from fluxforge.server.ray import build

    with pytest.raises(ValueError, match=r"unknown application args \['bogus'\]"):
        build({"bogus": "1"})
    app = build({"replicas": 3, "autoscale": "1:4", "max_ongoing_requests": "2", "data": "/tmp/x"})
    model = app._bound_deployment.init_args[1]._bound_deployment  # Ingress.bind(settings, model, slots)
    assert model._deployment_config.autoscaling_config.max_replicas == 4 and model.max_ongoing_requests == 2
    assert app._bound_deployment.init_args[2] == 8  # slots: the most replicas x their ongoing requests
