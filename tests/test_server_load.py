"""A bounded load test on loopback: 32 concurrent clients send 200 synchronous generations to the demo model
through a queue shorter than the load (--max-batch 4: requests waiting together run as one batch). Every
request is answered (200, or 429 with Retry-After), none is lost, and the server's memory after the run is
within 10% of its memory after a warm-up run of the same load. Latency percentiles and throughput are
printed (pytest -s)."""

from __future__ import annotations

import asyncio
import os
import statistics
import time

import httpx
from serving import PROMPT, Server

CLIENTS, REQUESTS, QUEUE = 32, 200, 8
PAUSE = 0.5  # s a client waits after a 429 before its next request (none is retried)


async def _load(url: str) -> tuple[list[tuple[int, float]], float]:
    todo = iter(range(REQUESTS))
    answers: list[tuple[int, float]] = []
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def one_client() -> None:
            for i in todo:
                body = {"prompt": PROMPT, "steps": 4, "seed": i}
                started = time.perf_counter()
                response = await client.post("/v1/images/generations", json=body)
                answers.append((response.status_code, time.perf_counter() - started))
                if response.status_code == 429:  # an answer; this client pauses before its next request
                    assert int(response.headers["Retry-After"]) >= 1
                    await asyncio.sleep(PAUSE)
                else:
                    assert response.status_code == 200, response.text
                    assert response.json()["data"][0]["seed"] == i

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(CLIENTS)))
        return answers, time.perf_counter() - started


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def test_load(tmp_path):
    batch = os.environ.get("LOAD_MAX_BATCH", "4")  # 1: the same load without batching
    server = Server(tmp_path / "data", "--max-queue", str(QUEUE), "--max-batch", batch)
    try:
        warmup, _ = asyncio.run(_load(server.url))  # the same load, first
        warm = server.rss_kib()
        answers, wall = asyncio.run(_load(server.url))
        after = server.rss_kib()
        statuses = [s for s, _ in answers]
        assert len(answers) == REQUESTS and set(statuses) <= {200, 429}
        ok = [t for s, t in answers if s == 200]
        assert ok and statuses.count(429) > 0  # the queue was shorter than the load
        # None lost: a job per 200, each succeeded; none left behind; a 429 queued nothing.
        with server.http() as c:
            metrics = c.get("/metrics").text
        served = statuses.count(200) + [s for s, _ in warmup].count(200)
        assert f'fluxforge_jobs{{status="succeeded"}} {served}\n' in metrics
        for status in ("queued", "running", "failed", "canceled"):
            assert f'fluxforge_jobs{{status="{status}"}} 0\n' in metrics
        assert abs(after - warm) <= 0.10 * warm, f"RSS {warm} KiB after warm-up, {after} KiB after the run"
        print(
            f"\n{REQUESTS} requests from {CLIENTS} clients, queue {QUEUE}: {statuses.count(200)} x 200, "
            f"{statuses.count(429)} x 429 in {wall:.1f} s; 200s: p50 {_percentile(ok, 50):.2f} s, "
            f"p99 {_percentile(ok, 99):.2f} s, {len(ok) / wall:.1f} images/s; all answers: p50 "
            f"{_percentile([t for _, t in answers], 50):.3f} s; RSS {warm / 1024:.0f} MiB after warm-up, "
            f"{after / 1024:.0f} MiB after ({(after - warm) / warm:+.1%})"
        )
    finally:
        server.stop()
