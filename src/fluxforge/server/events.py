"""Job events for server-sent events: numbered per job, kept for replay, delivered to asyncio subscribers
from any thread.

Every event is one SSE record:

    event: progress
    id: 7
    data: {"type": "progress", "job_id": "job_...", "step": 3, "total": 4}

Ids increase per job, so a client that reconnects with `Last-Event-ID: 7` gets what it missed from the
replay history (all events but previews, of which only the latest is kept).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

HISTORY = 1000  # events kept per job for replay
CHANNELS = 1000  # jobs whose events are kept in memory (least recently used dropped)


@dataclass(frozen=True)
class Event:
    id: int
    name: str
    data: dict[str, Any]

    def sse(self) -> bytes:
        payload = json.dumps({"type": self.name, **self.data}, separators=(",", ":"))
        return f"event: {self.name}\nid: {self.id}\ndata: {payload}\n\n".encode()


@dataclass
class _Channel:
    last: int
    history: deque[Event] = field(default_factory=lambda: deque(maxlen=HISTORY))
    preview: Event | None = None
    subscribers: set[Subscription] = field(default_factory=set)


class Subscription:
    """Events of one job for one asyncio consumer; `get` waits for the next one."""

    def __init__(self, hub: EventHub, job_id: str) -> None:
        self.hub, self.job_id = hub, job_id
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def deliver(self, event: Event) -> None:  # from any thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the client is gone
            pass

    async def get(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after `timeout` seconds."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None

    def close(self) -> None:
        self.hub._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventHub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._channels: OrderedDict[str, _Channel] = OrderedDict()

    def _channel(self, job_id: str, start: Callable[[], int]) -> _Channel:
        channel = self._channels.get(job_id)
        if channel is None:
            channel = self._channels[job_id] = _Channel(last=start())
            while len(self._channels) > CHANNELS:
                oldest = next(iter(self._channels))
                if self._channels[oldest].subscribers:
                    break
                del self._channels[oldest]
        self._channels.move_to_end(job_id)
        return channel

    def publish(self, job_id: str, name: str, data: dict[str, Any], start: Callable[[], int]) -> int:
        with self._lock:
            channel = self._channel(job_id, start)
            channel.last += 1
            event = Event(channel.last, name, {"job_id": job_id, **data})
            if name == "preview":
                channel.preview = event
            else:
                channel.history.append(event)
            subscribers = list(channel.subscribers)
        for subscription in subscribers:
            subscription.deliver(event)
        return event.id

    def subscribe(
        self, job_id: str, start: Callable[[], int], after: int | None = None
    ) -> tuple[Subscription, list[Event], int]:
        """A subscription, the events after id `after` still in the history (with the latest preview), and
        the id of the latest event so far. Called in the event loop that will read the subscription."""
        subscription = Subscription(self, job_id)
        with self._lock:
            channel = self._channel(job_id, start)
            channel.subscribers.add(subscription)
            missed: list[Event] = []
            if after is not None:
                missed = [e for e in channel.history if e.id > after]
                if channel.preview is not None and channel.preview.id > after:
                    missed.append(channel.preview)
                missed.sort(key=lambda e: e.id)
            return subscription, missed, channel.last

    def _unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            channel = self._channels.get(subscription.job_id)
            if channel is not None:
                channel.subscribers.discard(subscription)

    def listening(self, job_id: str) -> bool:
        """Whether anyone is subscribed to the job's events now (previews are made only then)."""
        with self._lock:
            channel = self._channels.get(job_id)
            return bool(channel and channel.subscribers)

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._channels.pop(job_id, None)
