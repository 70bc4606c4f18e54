"""fluxforge on Ray Serve: the same FastAPI app (endpoints, errors, job store) as the ingress deployment, and
the model as a deployment of N replicas (one GPU each where there are GPUs, CPU otherwise).

    fluxforge serve --ray --replicas 2                # a local cluster, started here
    fluxforge serve --ray --autoscale 1:4 --ray-address auto
    serve run fluxforge.server.ray:build model=/models/klein replicas=2 data=/srv/fluxforge

Admission stays in the ingress: its durable SQLite store and bounded queue (429 when full). `RayWorker` is
`LocalWorker`'s job flow with one slot per job the replicas can take at once (replicas x
`max_ongoing_requests`, the maximum when autoscaling), so jobs leave the queue only as fast as replicas take
them, in order; Ray Serve routes each to a replica and its `autoscaling_config` scales the replicas on
their ongoing requests. Each step's progress (and the denoised latents, for previews) streams back from the
replica; a cancel cancels the Serve request, which stops the replica's run at its next step. A job whose
replica dies runs again (once) on another.

The ingress has one replica, which holds the SQLite store: several ingress replicas on several machines
would need a shared store (a later step).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import RequestCancelledError
from ray.serve.handle import DeploymentHandle

from fluxforge.errors import GenerationCancelled
from fluxforge.pipeline import GenerationRequest, GenerationResult
from fluxforge.preview import Previewer
from fluxforge.sampling import StepInfo
from fluxforge.server.app import Settings, create_app, load_pipeline
from fluxforge.server.worker import LocalWorker, ReplicaLost, facts_of, pipeline_info

log = logging.getLogger("fluxforge.server")

APP_NAME = "fluxforge"
_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)
_INFO_TTL = 2.0  # s a replica's model facts are reused for /metrics and /v1/capabilities


@serve.deployment(name="model")
class ModelReplica:
    """One copy of the model; `run` streams ("step", StepInfo) events, then ("caches", (replica id, its
    caches' counters)) and ("results", [GenerationResult]), one per request of the batch."""

    def __init__(self, settings: Settings, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.pipe = load_pipeline(settings)
        self.pipe.limits = settings.limits  # each request of a batch is checked alone, as on arrival
        self.previewer = Previewer.fit(self.pipe.vae)
        self.replica = serve.get_replica_context().replica_id.unique_id

    def describe(self) -> dict[str, Any]:
        return {
            "info": {**pipeline_info(self.pipe), "replica": self.replica},
            "spec": self.pipe.spec,
            "facts": facts_of(self.pipe, self.previewer),
        }

    async def run(self, requests: list[GenerationRequest]) -> AsyncIterator[tuple[str, Any]]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def on_step(info: StepInfo) -> None:
            step = StepInfo(
                info.step, info.total, None, info.denoised.cpu() if info.denoised is not None else None
            )
            loop.call_soon_threadsafe(events.put_nowait, ("step", step))

        task = loop.run_in_executor(None, partial(self.pipe.run_batch, requests, on_step, cancel))
        try:
            while not (task.done() and events.empty()):
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            results = await task
        except asyncio.CancelledError:  # the ingress canceled the request: stop at the next step
            cancel.set()
            with contextlib.suppress(Exception):
                await task
            raise
        for result in results:
            result.info["replica"] = self.replica
            result.latents, result.pixels = result.latents.cpu(), None  # what travels: images, seeds, info
        yield ("caches", (self.replica, self.pipe.caches.stats()))
        yield ("results", results)


class RayWorker(LocalWorker):
    """The job flow of `LocalWorker`, each job run by a model replica through a Serve handle.

    Each replica has its own caches. Their counters come back with every run (and with the model facts
    `describe` gives, asked of one replica at most every _INFO_TTL s); `model_info` reports their sums as
    "caches" and each live replica's as "replica_caches" (/metrics labels a series per replica)."""

    def __init__(self, *args: Any, handle: DeploymentHandle, slots: int, **kwargs: Any) -> None:
        super().__init__(*args, slots=slots, **kwargs)
        self.handle = handle
        self._info: dict[str, Any] = {}
        self._info_at = 0.0
        self._caches: dict[str, dict[str, dict[str, int]]] = {}  # replica id -> its counters, as last seen
        self._caches_lock = threading.Lock()

    def model_info(self) -> dict[str, Any]:
        if self._info and time.monotonic() - self._info_at > _INFO_TTL:
            self._info_at = time.monotonic()
            with contextlib.suppress(Exception):  # a replica busy or restarting: the facts seen last
                self._described(self.handle.describe.remote().result(timeout_s=1.0)["info"])
            with contextlib.suppress(Exception):  # Ray's actor list unavailable: keep every replica seen
                live = _live_replicas()
                with self._caches_lock:  # a dead replica (and the one started for it) must not count twice
                    self._caches = {r: caches for r, caches in self._caches.items() if r in live}
        with self._caches_lock:
            per_replica = dict(sorted(self._caches.items()))
        return {**self._info, "caches": _summed(per_replica.values()), "replica_caches": per_replica}

    def _described(self, info: dict[str, Any]) -> None:
        self._info = info
        self._seen(info["replica"], info["caches"])

    def _seen(self, replica: str, caches: dict[str, dict[str, int]]) -> None:
        with self._caches_lock:
            self._caches[replica] = caches

    def _load_model(self) -> None:
        described = self.handle.describe.remote().result()
        self.spec, self.facts = described["spec"], described["facts"]
        self._described(described["info"])
        self._info_at = time.monotonic()

    def _execute(
        self,
        requests: list[GenerationRequest],
        on_step: Callable[[StepInfo], None],
        cancel: threading.Event,
    ) -> list[GenerationResult]:
        if cancel.is_set():
            raise GenerationCancelled("cancelled before the first step")
        stream = self.handle.options(stream=True).run.remote(requests)
        results = None
        try:
            for kind, value in stream:
                if cancel.is_set():
                    stream.cancel()
                    raise GenerationCancelled(f"cancelled after {value.step if kind == 'step' else 0} steps")
                if kind == "step":
                    on_step(value)
                elif kind == "caches":
                    self._seen(*value)
                else:
                    results = value
        except _LOST as exc:
            raise ReplicaLost(f"{type(exc).__name__}") from exc
        except RequestCancelledError:
            raise GenerationCancelled("cancelled") from None
        except RayTaskError as exc:  # the replica's own error (bad input, out of memory, ...), as it was
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            if isinstance(cause, _LOST):
                raise ReplicaLost(type(cause).__name__) from exc
            raise cause from None
        if results is None:
            raise ReplicaLost("the replica's stream ended without a result")
        return results


@serve.deployment(name="ingress", num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The HTTP API: fluxforge's FastAPI app, with a RayWorker over the model deployment."""

    def __init__(self, settings: Settings, model: DeploymentHandle, slots: int) -> None:
        self.settings, self.model, self.slots = settings, model, slots

    def __serve_build_asgi_app__(self) -> Any:
        def make_worker(*args: Any, **kwargs: Any) -> RayWorker:
            return RayWorker(*args, handle=self.model, slots=self.slots, **kwargs)

        return create_app(self.settings, make_worker=make_worker)


def application(
    settings: Settings,
    replicas: int = 1,
    autoscale: tuple[int, int] | None = None,
    max_ongoing_requests: int = 1,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float | None = None,
) -> Any:
    """The Serve application: the ingress, and the model deployment of `replicas` replicas (or autoscaled
    between `autoscale` = (min, max) on their ongoing requests). `gpus_per_replica` None: one where the
    cluster has GPUs, none otherwise. Paths in `settings` are made absolute: replicas run elsewhere."""
    import ray

    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    settings = dataclasses.replace(
        settings,
        data=Path(settings.data).resolve(),
        model=_absolute(settings.model),
        vae=_absolute(settings.vae),
        text_encoder=_absolute(settings.text_encoder),
        loras=tuple((name, str(Path(path).resolve())) for name, path in settings.loras),
        device="cuda" if gpus_per_replica else settings.device,
    )
    options: dict[str, Any] = {
        "max_ongoing_requests": max_ongoing_requests,
        "ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
    }
    if autoscale is not None:
        low, high = autoscale
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": low,
            "target_ongoing_requests": max_ongoing_requests,
        }
        most = high
    else:
        options["num_replicas"] = replicas
        most = replicas
    threads = max(1, int(cpus_per_replica))
    model = ModelReplica.options(**options).bind(settings, threads)
    return Ingress.bind(settings, model, most * max_ongoing_requests)


def build(args: dict[str, str]) -> Any:
    """For `serve run fluxforge.server.ray:build key=value ...` and Serve config files (`import_path`,
    `args`): model, data, replicas, autoscale ("1:4"), max_ongoing_requests, cpus_per_replica, max_queue,
    api_key, lora ("name=file,name=file")."""
    known = {"model", "data", "replicas", "autoscale", "max_ongoing_requests", "cpus_per_replica",
             "max_queue", "api_key", "lora", "dtype"}  # fmt: skip
    unknown = set(args) - known
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}; known: {sorted(known)}")
    loras = tuple(tuple(item.split("=", 1)) for item in args.get("lora", "").split(",") if item)
    settings = Settings(
        model=args.get("model"),
        data=Path(args.get("data", "fluxforge-data")),
        max_queue=int(args.get("max_queue", 16)),
        api_key=args.get("api_key") or os.environ.get("FLUXFORGE_API_KEY"),
        dtype=args.get("dtype", "auto"),
        loras=loras,  # type: ignore[arg-type]
    )
    autoscale = None
    if "autoscale" in args:
        low, high = (int(x) for x in args["autoscale"].split(":"))
        autoscale = (low, high)
    return application(
        settings,
        replicas=int(args.get("replicas", 1)),
        autoscale=autoscale,
        max_ongoing_requests=int(args.get("max_ongoing_requests", 1)),
        cpus_per_replica=float(args.get("cpus_per_replica", 1)),
    )


def _summed(replicas: Iterable[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    """The replicas' cache counters added up, cache by cache and counter by counter."""
    total: dict[str, dict[str, int]] = {}
    for caches in replicas:
        for name, stats in caches.items():
            into = total.setdefault(name, {})
            for key, value in stats.items():
                into[key] = into.get(key, 0) + value
    return total


def _live_replicas() -> set[str]:
    """The ids of the model deployment's replicas alive now (named actors "...#model#<id>")."""
    import ray

    return {
        actor["name"].rsplit("#", 1)[1]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if "#model#" in actor["name"]
    }


def _absolute(path: str | None) -> str | None:
    if path is None or not Path(path).exists():
        return path  # None (the demo) or a hub id
    return str(Path(path).resolve())


def serve_on_ray(
    settings: Settings,
    host: str,
    port: int,
    replicas: int,
    autoscale: tuple[int, int] | None,
    address: str | None,
) -> int:
    """`fluxforge serve --ray`: start (or join, with `address`) a Ray cluster, run the application on it
    behind Serve's HTTP proxy at host:port, and remove it again on SIGINT / SIGTERM."""
    import signal
    import socket

    import ray

    if port == 0:  # Serve's proxy needs a port number: a free one, as --port 0 means
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(settings, replicas, autoscale), name=APP_NAME, route_prefix="/")
    scale = f"{autoscale[0]}-{autoscale[1]} replicas" if autoscale else f"{replicas} replica(s)"
    log.warning("on Ray Serve: the API as the ingress, the model as %s", scale)
    print(f"fluxforge: serving on http://{host}:{port}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    log.info("stopping: removing the application from the cluster")
    serve.delete(APP_NAME)
    serve.shutdown()
    ray.shutdown()
    return 0
