"""HTTP gateway of the ingest service: JSON in, events on ``ratings`` and ``movies``.

- ``POST /ratings``: a ``RatingSubmitted`` as JSON (``event_id`` assigned if absent).
- ``POST /movies``: a ``MoviePublished`` as JSON.
- ``GET /health``: ``{"status": "ok"}``.

Writes need ``Authorization: Bearer <INGEST_TOKEN>`` when ``INGEST_TOKEN`` is set (401
without it); on an address other than loopback the gateway refuses to start without one.

A valid event is answered ``202`` with the event as published, once the broker has
confirmed its delivery; an invalid body ``400`` with ``{"error": "<reason>"}``; a body
over ``max_message_bytes`` ``413``; a delivery the broker refused ``503``. Rejected
requests never reach Kafka: the client gets the reason instead of a dead letter.

The producer is polled on its own thread, and each request awaits its delivery report
through an asyncio future, so the event loop never blocks on the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from confluent_kafka import KafkaError, Message, Producer

from shared import metrics
from shared.config import Settings
from shared.events import MOVIES, RATINGS, TopicSpec, decode, encode
from shared.exceptions import ConfigurationError, InvalidEventError
from shared.ingest import SERVICE
from shared.kafka.client import make_producer
from shared.kafka.message import Outgoing
from shared.kafka.publisher import DeliveryError
from shared.metrics import HealthServer

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DELIVERY_TIMEOUT_MS = 30_000
"""How long (ms) the producer keeps retrying a message before the request gets 503."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def handle_submission(spec: TopicSpec, body: bytes) -> Outgoing:
    """Validate a request body as an event of ``spec``'s topic.

    Raises:
        InvalidEventError: not JSON, not an object, or not a valid event (the message
            names the field and why).
    """
    return Outgoing(spec, decode(spec.record, body))


class AsyncPublisher:
    """Produces events and lets coroutines await their delivery reports."""

    def __init__(self, settings: Settings, producer: Producer | None = None) -> None:
        self._settings = settings
        self._producer: Producer | None = producer or make_producer(
            settings, **{"message.timeout.ms": DELIVERY_TIMEOUT_MS}
        )
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="ingest-delivery", daemon=True)

    def start(self) -> None:
        self._poller.start()

    async def publish(self, outgoing: Outgoing) -> None:
        """Produce one event and return once the broker has it.

        Raises:
            DeliveryError: the broker refused it or did not answer in time.
        """
        producer = self._producer
        if producer is None:
            raise DeliveryError("the gateway is shutting down")
        loop = asyncio.get_running_loop()
        delivered: asyncio.Future[None] = loop.create_future()

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            # Runs on the poller thread (or in close()'s flush): hand over to the loop.
            # RuntimeError: the loop is closed, nobody is waiting for this answer any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, delivered, err)

        topic = self._settings.topic(outgoing.spec.name)
        key, value = outgoing.spec.key_of(outgoing.event), encode(outgoing.event)
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                break
            except BufferError:
                # The local queue is full: give the poller time to drain it.
                await asyncio.sleep(0.01)
        await delivered

    def close(self, timeout_s: float = 10.0) -> int:
        """Stop polling and deliver what is queued; returns messages left undelivered."""
        self._stop.set()
        if self._poller.is_alive():
            self._poller.join()
        producer, self._producer = self._producer, None
        # Dropping the last reference destroys the client now, not whenever the object
        # holding this publisher is collected (long after its broker may be gone).
        return 0 if producer is None else int(producer.flush(timeout_s))

    def _poll(self) -> None:
        while not self._stop.is_set() and self._producer is not None:
            self._producer.poll(0.05)


def _settle(future: asyncio.Future[None], err: KafkaError | None) -> None:
    if future.done():  # the request was cancelled (client went away)
        return
    if err is None:
        future.set_result(None)
    else:
        future.set_exception(DeliveryError(str(err)))


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``localhost`` or a loopback address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _error(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors (404, 405, 413) as ``{"error": ...}`` like ours."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason if not exc.text else exc.text)


READY_EVERY_S = 2.0
"""How often (seconds) the listening gateway rewrites its ready file."""


class Gateway:
    """The HTTP server: routes, a producer and the ready file."""

    def __init__(
        self,
        settings: Settings,
        *,
        host: str = DEFAULT_HOST,
        port: int | None = None,
        publisher: AsyncPublisher | None = None,
    ) -> None:
        """``port`` defaults to ``settings.ingest_http_port``; 0 picks a free port.

        Raises:
            ConfigurationError: ``host`` is not a loopback address and no
                ``ingest_token`` is set: anyone who reaches the port could write.
        """
        token = settings.ingest_token
        if token is None and not is_loopback(host):
            raise ConfigurationError(
                f"the gateway would listen on {host} with no INGEST_TOKEN: set one (writes "
                "must then carry 'Authorization: Bearer <token>') or listen on 127.0.0.1"
            )
        self._token = None if token is None else f"Bearer {token.get_secret_value()}".encode()
        self._settings = settings
        self._host = host
        self._port = settings.ingest_http_port if port is None else port
        self._publisher = publisher or AsyncPublisher(settings)
        self._runner: web.AppRunner | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self.accepted = 0
        self.rejected = 0

    @property
    def port(self) -> int:
        """The bound port (after ``start``)."""
        if self._runner is None:
            raise RuntimeError("gateway is not started")
        address: Any = self._runner.addresses[0]
        return int(address[1])

    @property
    def listening(self) -> bool:
        return self._runner is not None and self._heartbeat is not None

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self._settings.max_message_bytes, middlewares=[_json_errors]
        )
        app.router.add_post("/ratings", self._submit(RATINGS))
        app.router.add_post("/movies", self._submit(MOVIES))
        app.router.add_get("/health", self._health)
        return app

    async def start(self) -> None:
        """Listen, then keep the ready file fresh (every ``READY_EVERY_S`` seconds)."""
        self._publisher.start()
        # No access log: one line per rating would drown the service's own logs.
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self._host, self._port).start()
        except OSError:
            await self.stop()  # e.g. the port is taken: release the producer
            raise
        self._heartbeat = asyncio.create_task(self._keep_ready())
        log.info("service=%s listening url=%s", SERVICE, self.url)

    async def _keep_ready(self) -> None:
        ready = self._settings.ready_file(SERVICE)
        ready.parent.mkdir(parents=True, exist_ok=True)
        while True:
            ready.write_text(str(time.time()))
            await asyncio.sleep(READY_EVERY_S)

    async def stop(self) -> None:
        """Remove the ready file, stop listening, deliver what is queued."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        self._settings.ready_file(SERVICE).unlink(missing_ok=True)
        if self._runner is not None:
            await self._runner.cleanup()
        left = await asyncio.get_running_loop().run_in_executor(None, self._publisher.close)
        log.info(
            "service=%s stopped accepted=%d rejected=%d undelivered=%d",
            SERVICE,
            self.accepted,
            self.rejected,
            left,
        )

    def _submit(self, spec: TopicSpec) -> Handler:
        async def submit(request: web.Request) -> web.StreamResponse:
            if self._token is not None and not hmac.compare_digest(
                request.headers.get("Authorization", "").encode(), self._token
            ):
                self.rejected += 1
                return _error(401, "writes need the header 'Authorization: Bearer <INGEST_TOKEN>'")
            body = await request.read()
            try:
                outgoing = handle_submission(spec, body)
            except InvalidEventError as exc:
                self.rejected += 1
                log.warning("service=%s path=%s rejected error=%s", SERVICE, request.path, exc)
                return _error(400, str(exc))
            try:
                await self._publisher.publish(outgoing)
            except DeliveryError as exc:
                log.error("service=%s topic=%s delivery failed error=%s", SERVICE, spec.name, exc)
                return _error(503, f"delivery failed: {exc}")
            self.accepted += 1
            metrics.MESSAGES_OUT.labels(SERVICE, spec.name).inc()
            return web.Response(
                body=encode(outgoing.event), status=202, content_type="application/json"
            )

        return submit

    async def _health(self, _request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})


async def serve(
    settings: Settings,
    *,
    host: str = DEFAULT_HOST,
    port: int | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the gateway until ``stop`` is set, or until SIGTERM/SIGINT when none is given."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, _on_signal, signum, stop)
    gateway = Gateway(settings, host=host, port=port)
    await gateway.start()
    health = HealthServer(
        settings, SERVICE, alive=lambda: True, ready=lambda: gateway.listening
    ).start()
    try:
        await stop.wait()
    finally:
        health.stop()
        await gateway.stop()


def _on_signal(signum: int, stop: asyncio.Event) -> None:
    log.info("signal=%s service=%s stopping", signal.Signals(signum).name, SERVICE)
    stop.set()
