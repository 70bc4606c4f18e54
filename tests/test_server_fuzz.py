"""Fuzz the server from its own /openapi.json with schemathesis: every operation, valid and invalid bodies,
bounded in examples; no answer is a 5xx, and the server still serves a real generation afterwards.

The server runs with small limits (4 steps, 128 x 128 pixels, 2 images) so that the valid requests the
fuzzer queues cost the demo model a fraction of a second each; the rules are the same at any limit."""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from serving import PROMPT, Server

EXAMPLES = 40  # per operation and mode (positive, negative)
SENT: list[tuple[str, str, int]] = []


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    s = Server(
        tmp_path_factory.mktemp("fuzz") / "data",
        "--max-steps", "4", "--max-pixels", "16384", "--max-n", "2", "--max-queue", "8",
        "--webhook-secret", "k", "--sse-keepalive", "1",
    )  # fmt: skip
    yield s
    s.stop()


def test_no_request_gets_a_server_error(fuzz_server):
    """Each operation of the schema, positive and negative cases from schemathesis's strategies, driven by
    hypothesis (schemathesis's own pytest plugin does not load under pytest 9)."""
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz(operation, mode, fuzz_server.url)
            except hypothesis.errors.Unsatisfiable:  # nothing to negate (GET /health takes no input)
                assert mode == GenerationMode.NEGATIVE


def _fuzz(operation, mode, url):
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        derandomize=True,
        database=None,
    )
    def run(case):
        response = case.call(base_url=url, timeout=120)
        SENT.append((case.method, case.path, response.status_code))
        assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text[:500]}"
        kind = response.headers.get("content-type") or [""]
        if response.status_code >= 400 and (kind[0] if isinstance(kind, list) else kind).startswith(
            "application/json"
        ):
            assert {"message", "type", "param", "code"} <= set(response.json()["error"])

    run()


def test_the_server_still_answers_afterwards(fuzz_server):
    from collections import Counter

    print(f"\nschemathesis sent {len(SENT)} requests; statuses {dict(Counter(s for _, _, s in SENT))}")
    with fuzz_server.http() as c:
        assert c.get("/health").status_code == 200
        response = c.post("/v1/images/generations", json={"prompt": PROMPT, "steps": 2, "seed": 0})
        assert response.status_code == 200 and response.json()["data"][0]["b64_json"]
    assert fuzz_server.process.poll() is None
