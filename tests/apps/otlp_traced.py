"""An app traced with the real OpenTelemetry SDK, exporting over OTLP/HTTP.

The exporter's endpoint comes from ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; the batch span
processor's delay is long, so that only an explicit flush sends spans before it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import lifecycle

provider = TracerProvider(resource=Resource.create({"service.name": "otlp-traced"}))
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=60_000))
trace.set_tracer_provider(provider)

lc = lifecycle.Lifecycle(shutdown_timeout=5.0)


@lc.service
async def db() -> AsyncIterator[str]:
    yield "db"


@lc.service
async def cache(db: str) -> AsyncIterator[str]:
    yield "cache"


lifecycle.instrument_tracing(lc)


async def ready(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/ready", ready)], lifespan=lc.lifespan)
