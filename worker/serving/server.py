"""`unlearn serve --model NAME`: the downstream model server.

It follows `model.versions` as a serving team would: on start it replays the topic to learn the
model's newest version and every revocation (taking the newest manifest in the store only when no
event names the model), then hot-swaps to each version as it is published, re-checking every few
seconds that the version it serves has not been revoked since. It acts only on events the worker
signed (`worker.signing`): any other record is counted, logged and skipped, so a forged one
changes nothing. `worker.serving.served.ServedModel` decides which version may answer; this module is
its HTTP face and its Kafka feed:

    POST /predict   {"instances": [[...], ...]} (or rows by feature name, {"age": 39, "workclass": "Private"})
                    -> predictions (and labels, for text classes) and probabilities, and the version
                    (a bearer token when UNLEARN_SERVE_TOKEN_FILE is set; bodies over
                    UNLEARN_SERVE_MAX_BODY_BYTES get 413; bad input a 422 that never echoes it)
    GET  /version   the version served (or why none is), the newest published, the revoked ones
    GET  /healthz   200 while a version is served, 503 with the reason otherwise
    GET  /metrics   Prometheus: the version served, seconds since it was superseded, records rejected
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, Header, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, Field

from worker import events, kafka_clients, policy, signing
from worker.config import Settings
from worker.serving.served import Announcement, ServedModel

log = logging.getLogger(__name__)

MAX_INSTANCES = 10_000  # rows per /predict call


class VersionFollower(threading.Thread):
    """Feeds `model.versions` into a ServedModel: the whole topic first, then each new event."""

    def __init__(self, settings: Settings, served: ServedModel, verifier: signing.Verifier | None = None):
        super().__init__(name="model-versions", daemon=True)
        self.settings = settings
        self.served = served
        self.verifier = verifier or signing.verifier(settings)
        self.key = served.model.encode()  # model.versions is keyed by model name
        self.replayed = threading.Event()
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self._follow()
            except KafkaError as exc:
                log.warning("cannot read %s (%s); retrying", self.settings.topic_versions, exc.__class__.__name__)
                self._stop.wait(policy.SERVE_FOLLOW_RETRY_S)
            except Exception:  # noqa: BLE001 - the thread must outlive any one failure, or serving freezes
                log.exception("following %s failed; starting over", self.settings.topic_versions)
                self._stop.wait(policy.SERVE_FOLLOW_RETRY_S)

    def _follow(self) -> None:
        # no consumer group: every server replica reads every event
        consumer = KafkaConsumer(**kafka_clients.kafka_client(self.settings), group_id=None,
                                 enable_auto_commit=False, auto_offset_reset="earliest",
                                 fetch_max_wait_ms=kafka_clients.FETCH_MAX_WAIT_MS)
        try:
            partitions = self._partitions(consumer)
            if not partitions:
                return
            consumer.assign(partitions)
            consumer.seek_to_beginning(*partitions)
            end = consumer.end_offsets(partitions)
            next_refresh = time.monotonic() + self.settings.serve_refresh_seconds
            while not self._stop.is_set():
                announced = self._announce(consumer.poll(timeout_ms=500))
                if not self.replayed.is_set() and all(consumer.position(p) >= end[p] for p in partitions):
                    self.served.discover()
                    self.replayed.set()
                    announced = True
                if not self.replayed.is_set():
                    continue
                if announced:
                    self.served.settle()
                if time.monotonic() >= next_refresh:
                    self.served.refresh()
                    next_refresh = time.monotonic() + self.settings.serve_refresh_seconds
        finally:
            consumer.close()

    def _partitions(self, consumer: KafkaConsumer) -> list[TopicPartition]:
        topic = self.settings.topic_versions
        while not self._stop.is_set():
            found = consumer.partitions_for_topic(topic)
            if found:
                return [TopicPartition(topic, p) for p in sorted(found)]
            log.info("waiting for topic %s to exist", topic)
            self._stop.wait(policy.SERVE_TOPIC_WAIT_S)
        return []

    def _announce(self, batch: dict) -> bool:
        announced = False
        for records in batch.values():
            for record in records:
                if record.key is not None and record.key != self.key:
                    continue  # another model's version (the contract keys by model name)
                try:
                    event = events.decode(record.value, record.headers)
                except events.InvalidEvent as exc:
                    log.warning("skipped an invalid event on %s: %s", record.topic, exc.reason)
                    continue
                if event.type == events.MODEL_VERSION_PUBLISHED and event.data["model"] == self.served.model:
                    problem = self.verifier.check_event(event)
                    if problem is not None:
                        where = f"{record.topic}/{record.partition}@{record.offset}"
                        self.served.reject(problem, event.data["version"], where)
                        continue
                    self.served.announce(Announcement.from_event(event.data))
                    announced = True
        return announced


class ServingCollector:
    """The server's gauges, read from its ServedModel at scrape time."""

    def __init__(self, served: ServedModel):
        self.served = served

    def collect(self):
        model = self.served.model
        state = self.served.state()
        current = state.current
        version = GaugeMetricFamily("unlearning_served_model_version",
                                    "Model version this server answers with (0: none).", labels=["model"])
        version.add_metric([model], current.version if current else 0)
        superseded = GaugeMetricFamily(
            "unlearning_served_version_superseded_seconds",
            "Seconds since the newest version was published, while this server does not serve it"
            " (0: it serves the newest).",
            labels=["model"])
        superseded.add_metric([model], self.served.superseded_seconds())
        rejected = CounterMetricFamily(
            "unlearning_served_rejected_versions",
            "model.versions records for this model not acted on, by reason (unsigned, bad_signature).",
            labels=["model", "reason"])
        for reason in (signing.UNSIGNED, signing.BAD_SIGNATURE):
            rejected.add_metric([model, reason], state.rejected.get(reason, 0))
        yield version
        yield superseded
        yield rejected


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413 before it is read
    whole (by its Content-Length, or as it streams in when it has none)."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._too_large(send)
        seen, refused = 0, False

        async def limited_receive():
            # over the limit: answer 413 now and tell the app the client went away
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit and not refused:
                refused = True
                await self._too_large(send)
            return {"type": "http.disconnect"} if refused else message

        async def guarded_send(message):
            if not refused:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)

    async def _too_large(self, send) -> None:
        response = JSONResponse({"detail": f"request body over {self.limit} bytes"}, status_code=413)
        await response({"type": "http"}, None, send)


def _check_token(settings: Settings) -> Callable[[str | None], None]:
    """The check `/predict` makes of its Authorization header: with UNLEARN_SERVE_TOKEN_FILE set,
    `Bearer <token>` (compared in constant time), else nothing. The file is read once, here."""
    token = settings.serve_token_file.read_text().strip().encode() if settings.serve_token_file else None
    if token is not None and not token:
        raise ValueError(f"UNLEARN_SERVE_TOKEN_FILE {settings.serve_token_file} is empty")

    def check(authorization: str | None) -> None:
        if token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
            raise HTTPException(401, detail="a bearer token is required", headers={"WWW-Authenticate": "Bearer"})

    return check


class PredictRequest(BaseModel):
    instances: list[Any] = Field(min_length=1, max_length=MAX_INSTANCES, description=(
        "Rows of raw features as in the training data: (n, d) or (n, *input_shape)."))


def create_app(served: ServedModel, follower: VersionFollower | None = None) -> FastAPI:
    """The HTTP API over `served`; `follower`, when given, runs for the app's lifetime."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if follower is not None:
            follower.start()
        yield
        if follower is not None:
            follower.stop()

    settings = served.settings
    docs = settings.serve_docs
    app = FastAPI(title=f"unlearning-worker model server: {served.model}", lifespan=lifespan,
                  docs_url="/docs" if docs else None, redoc_url=None, openapi_url="/openapi.json" if docs else None)
    app.add_middleware(BodyLimit, limit=settings.serve_max_body_bytes)
    authorized = _check_token(settings)
    metrics = CollectorRegistry()
    metrics.register(ServingCollector(served))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # where and what, never the input itself (FastAPI's default echoes it back, whatever its size)
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))[:200], "type": e.get("type")}
                  for e in exc.errors()[:10]]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.post("/predict")
    def predict(request: PredictRequest, authorization: str | None = Header(default=None)) -> dict[str, Any]:
        authorized(authorization)
        loaded = served.current  # one read: the whole request uses one version
        if loaded is None:
            raise HTTPException(503, detail=served.state().problem, headers={"Retry-After": "5"})
        by_name = any(isinstance(row, dict) for row in request.instances)
        try:
            features = loaded.encode(request.instances) if by_name else np.asarray(request.instances, dtype=np.float32)
        except (ValueError, TypeError, OverflowError) as exc:
            # numpy's own messages quote the input; ours (by name) never do
            detail = str(exc) if by_name else "every feature must be a number, in rows of equal length"
            raise HTTPException(422, detail=f"instances: {detail}") from None
        if not np.isfinite(features).all():
            raise HTTPException(422, detail="instances: every feature must be a finite number (no NaN, Infinity or overflow)")
        try:
            probabilities = loaded.predict_proba(features)
        except ValueError as exc:
            raise HTTPException(422, detail=f"instances: {exc}") from None
        predictions = probabilities.argmax(axis=1).tolist()
        answer = {"model": loaded.model, "version": loaded.version, "predictions": predictions}
        if loaded.class_names is not None:
            answer["labels"] = [loaded.class_names[k] for k in predictions]
        if not settings.serve_labels_only:
            answer["probabilities"] = probabilities.tolist()
        return answer

    @app.get("/version")
    def version() -> dict[str, Any]:
        state = served.state()
        current = state.current
        return {
            "model": served.model,
            "serving": current is not None,
            "version": current.version if current else None,
            "created_at": current.manifest["created_at"] if current else None,
            "erasure_request_ids": current.manifest["erasure_request_ids"] if current else [],
            "newest_version": state.newest.version if state.newest else None,
            "revoked_versions": list(state.revoked),
            "problem": state.problem,
        }

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        state = served.state()
        if state.current is None:
            return JSONResponse({"status": "not serving", "model": served.model, "reason": state.problem},
                                status_code=503)
        return JSONResponse({"status": "serving", "model": served.model, "version": state.current.version})

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    return app


def run(settings: Settings, model: str, port: int) -> None:
    """Serve `model` on `settings.serve_addr:port` until interrupted."""
    import uvicorn

    served = ServedModel(model, settings)
    app = create_app(served, VersionFollower(settings, served))
    log.info("serving %s on http://%s:%d", model, settings.serve_addr, port)
    # log_config=None: uvicorn's records go through the handlers worker.logs configured
    uvicorn.run(app, host=settings.serve_addr, port=port, log_config=None)
