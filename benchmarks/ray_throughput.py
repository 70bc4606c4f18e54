"""Throughput of `fluxforge serve --ray` with 1 and 2 model replicas on the same load, beside the plain
server, in one run: N jobs submitted at once to /v1/jobs, timed from the first submission to the last
result. Starts its own local Ray cluster (`ray start --head --num-cpus 3`) and stops it at the end.

    python benchmarks/ray_throughput.py [--jobs 8] [--steps 100] [--size 64]

Each Ray replica gets 1 CPU and runs torch on one thread; the plain server runs one job at a time with
torch on every core. On a 2-core machine two replicas can at best double one replica's throughput, and
the plain server's two threads are the fair comparison for both.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthy(client: httpx.Client) -> bool:
    try:
        return client.get("/health").status_code == 200
    except httpx.TransportError:
        return False


def run(args: argparse.Namespace, extra: list[str], data: Path) -> float:
    """Images per second for the load on a server started with `extra`."""
    port = free_port()
    command = [sys.executable, "-m", "fluxforge", "serve", "--port", str(port), "--data", str(data)]
    command += ["--max-queue", str(args.jobs), *extra]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in server.stdout:
            if "serving on" in line:
                break
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=600) as client:
            while not healthy(client):
                time.sleep(0.2)
            body = {"prompt": "a red circle", "steps": args.steps, "width": args.size, "height": args.size}
            client.post("/v1/jobs", json={**body, "seed": 0})  # warm-up
            time.sleep(0.5)
            while client.get("/health").json()["status"] != "ready":
                time.sleep(0.2)
            start = time.perf_counter()
            ids = [client.post("/v1/jobs", json={**body, "seed": i}).json()["id"] for i in range(args.jobs)]
            for job_id in ids:
                while client.get(f"/v1/jobs/{job_id}").json()["status"] not in ("succeeded", "failed"):
                    time.sleep(0.05)
            return args.jobs / (time.perf_counter() - start)
    finally:
        server.terminate()
        server.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a loopback cluster of its own (see tests/test_server_ray.py)
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    head = free_port()
    start = [ray, "start", "--head", f"--port={head}", "--num-cpus=3", "--num-gpus=0",
             "--include-dashboard=false", "--disable-usage-stats"]  # fmt: skip
    subprocess.run(start, check=True, capture_output=True)
    print(f"{args.jobs} demo jobs of {args.steps} steps at {args.size}x{args.size}, {os.cpu_count()} CPUs")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = {"plain server (torch on every core)": run(args, [], Path(tmp) / "plain")}
            for replicas in (1, 2):
                extra = ["--ray", "--replicas", str(replicas), "--ray-address", f"127.0.0.1:{head}"]
                results[f"Ray Serve, {replicas} replica(s)"] = run(args, extra, Path(tmp) / f"ray{replicas}")
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True)
    one = results["Ray Serve, 1 replica(s)"]
    for name, rate in results.items():
        print(f"{name:38s} {rate:6.2f} images/s   {rate / one:5.2f}x one replica")


if __name__ == "__main__":
    main()
