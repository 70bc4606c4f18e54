"""Jobs survive the server: kill -9 with jobs queued and running, restart, and every job reaches a final
state once; SIGTERM lets the running job finish within --grace, else puts it back in the queue."""

from __future__ import annotations

import time

import numpy as np
from serving import PROMPT, Server, WebhookReceiver, picture, wait_status

import fluxforge as ff


def _running(client, job_id, step=3, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job["progress"]["step"] >= step:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not reach step {step}: {job['status']}")


def test_kill_9_loses_nothing_and_completes_nothing_twice(tmp_path):
    data = tmp_path / "data"
    receiver = WebhookReceiver()
    args = ("--webhook-secret", "k")
    server = Server(data, *args)
    try:
        with server.http() as c:
            hook = {"webhook_url": receiver.url}
            long = c.post("/v1/jobs", json={"prompt": PROMPT, "steps": 300, "seed": 1, **hook}).json()
            short = [
                c.post("/v1/jobs", json={"prompt": PROMPT, "steps": 8, **hook, **seed}).json()
                for seed in ({"seed": 2}, {}, {"seed": 4})  # one without a seed: drawn at admission, kept
            ]
            seeds = [c.get(f"/v1/jobs/{j['id']}").json()["request"]["seed"] for j in short]
            _running(c, long["id"])
        server.kill()  # kill -9 with one job running (its first attempt) and three queued

        server = Server(data, *args)
        with server.http() as c:
            again = _running(c, long["id"])  # the interrupted job runs again, first in line
            assert again["attempts"] == 2
        server.kill()  # ... and is killed again during its second attempt

        server = Server(data, *args)
        with server.http() as c:
            finals = {
                j["id"]: wait_status(c, j["id"], ("succeeded", "failed", "canceled")) for j in [long, *short]
            }
            assert finals[long["id"]]["status"] == "failed"
            assert finals[long["id"]]["error"]["code"] == "interrupted"
            pipe = ff.Pipeline.from_pretrained()
            for job, seed in zip(short, seeds, strict=True):
                done = finals[job["id"]]
                assert done["status"] == "succeeded" and done["attempts"] == 1
                assert done["result"]["images"][0]["seed"] == seed
                got = picture(c.get(done["result"]["images"][0]["url"]).content)
                assert np.array_equal(got, np.asarray(pipe.generate(PROMPT, seed=seed, steps=8).images[0]))
            listed = c.get("/v1/jobs", params={"limit": 100}).json()["data"]
            assert sorted(j["id"] for j in listed) == sorted(finals)
        receiver.wait(4)
        finished = {}
        for body in receiver.bodies():  # delivery is at least once; a second completion would differ
            finished.setdefault(body["id"], set()).add((body["status"], body["finished_at"]))
        assert {k: len(v) for k, v in finished.items()} == {j: 1 for j in finals}
    finally:
        server.stop()
        receiver.close()


def test_sigterm_waits_for_the_running_job_within_grace(tmp_path):
    server = Server(tmp_path / "data", "--grace", "60")
    with server.http() as c:
        job = c.post("/v1/jobs", json={"prompt": PROMPT, "steps": 60, "seed": 0}).json()
        queued = c.post("/v1/jobs", json={"prompt": PROMPT, "steps": 2, "seed": 0}).json()
        _running(c, job["id"], step=1)
        assert server.terminate() == 0
    server = Server(tmp_path / "data")
    try:
        with server.http() as c:
            done = c.get(f"/v1/jobs/{job['id']}").json()
            assert done["status"] == "succeeded" and done["attempts"] == 1  # finished before the stop
            assert wait_status(c, queued["id"], ("succeeded",))["attempts"] == 1  # left for this start
    finally:
        server.stop()


def test_sigterm_past_grace_puts_the_job_back(tmp_path):
    server = Server(tmp_path / "data", "--grace", "0.5")
    with server.http() as c:
        job = c.post("/v1/jobs", json={"prompt": PROMPT, "steps": 150, "seed": 0}).json()
        _running(c, job["id"], step=1)
        started = time.monotonic()
        assert server.terminate() == 0
        assert time.monotonic() - started < 20
    server = Server(tmp_path / "data")
    try:
        with server.http() as c:
            done = wait_status(c, job["id"], ("succeeded", "failed"))
            assert done["status"] == "succeeded" and done["attempts"] == 2
    finally:
        server.stop()
