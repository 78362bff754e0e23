"""Streaming synthesis: audio bytes sent while they are generated (ADR 0005).

POST /synthesize/stream takes the /synthesize body (`async_mode` ignored); GET /synthesize/stream
takes the same fields as query parameters, so `<audio src="/synthesize/stream?text=...">` plays it.
The handler waits for the first decoded patch before it answers, so every error that can happen
before audio exists (validation, unknown LoRA, bad reference audio, the engine failing at once)
is a normal 4xx/5xx JSON response. After that the status is 200 and a failure can only abort the
connection (the client sees a truncated chunked body).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.responses import StreamingResponse
from starlette.types import Send

from ..audio.streaming import StreamEncoder, TimeStretcher
from ..domain import OutputFormat
from ..errors import VoxError
from ..tasks.service import TaskService
from ..tasks.stream import AudioStream
from .routes import ServiceDep, to_synthesis_input
from .schemas import SEED_MAX, SYNTHESIS_ERRORS, SynthesizeRequest

log = logging.getLogger("voxcpm_api.stream")

router = APIRouter()


class AudioStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator, so a client that goes away while a
    chunk is being sent (not only while the next one is awaited) still stops the generation."""

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()  # our generators' cleanup never suspends, so this runs even when cancelled


async def first_audio(stream: AudioStream) -> np.ndarray:
    """The first decoded block; closes the stream on any failure, so nothing keeps generating."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return np.zeros(0, dtype=np.float32)
    except BaseException:
        stream.close()
        raise


async def encoded_audio(first: np.ndarray, stream: AudioStream, encoder: StreamEncoder,
                        stretcher: TimeStretcher | None = None) -> AsyncIterator[bytes]:
    """Encoded bytes of `first` then of every further block, as soon as the encoder releases them."""
    try:
        block: np.ndarray | None = first
        while block is not None:
            if stretcher is not None:
                block = stretcher.feed(block)
            data = encoder.feed(block) if block.size else b""
            if data:
                yield data
            try:
                block = await stream.__anext__()
            except StopAsyncIteration:
                block = None
        tail = stretcher.finish() if stretcher is not None else np.zeros(0, dtype=np.float32)
        data = (encoder.feed(tail) if tail.size else b"") + encoder.finish()
        if data:
            yield data
    except VoxError as exc:  # the status line is gone: aborting the connection is the only signal left
        log.warning("stream aborted after its first audio: %s", exc.message)
        raise
    finally:
        stream.close()


def stream_headers(stream: AudioStream, encoder: StreamEncoder) -> dict[str, str]:
    return {"X-Seed": str(stream.params.seed), "X-Sample-Rate": str(encoder.sample_rate_hz),
            "Cache-Control": "no-store", "X-Accel-Buffering": "no"}


async def _respond(service: TaskService, body: SynthesizeRequest, arrived_at: float) -> AudioStreamingResponse:
    fmt = body.response_format.value
    sample_rate, stream = await service.open_stream(to_synthesis_input(body), arrived_at=arrived_at)
    first = await first_audio(stream)
    try:
        encoder = StreamEncoder(fmt, sample_rate)
    except BaseException:
        stream.close()
        raise
    return AudioStreamingResponse(encoded_audio(first, stream, encoder), media_type=encoder.media_type,
                                  headers=stream_headers(stream, encoder))


STREAM_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"description": "Audio bytes, chunked, sent as they are generated (X-Seed, X-Sample-Rate headers).",
          "content": {"audio/mpeg": {}, "audio/ogg": {}, "audio/wav": {}, "audio/flac": {}, "audio/pcm": {}}},
    **{code: entry for code, entry in SYNTHESIS_ERRORS.items() if code != 409},  # no task to cancel
}


@router.post("/synthesize/stream", tags=["streaming"], response_class=AudioStreamingResponse,
             responses=STREAM_RESPONSES)
async def synthesize_stream(body: SynthesizeRequest, service: ServiceDep) -> AudioStreamingResponse:
    """The /synthesize body (`async_mode` is ignored); audio streams back while it is generated.

    The first bytes leave once the first patch is decoded (plus the codec's look-ahead for mp3).
    A client that disconnects stops the generation at the next patch. No task is stored.
    """
    return await _respond(service, body, time.time())


@router.get("/synthesize/stream", tags=["streaming"], response_class=AudioStreamingResponse,
            responses=STREAM_RESPONSES)
async def synthesize_stream_get(
    request: Request, service: ServiceDep,
    text: Annotated[str, Query(description="Text to synthesize.")],
    lora_name: Annotated[str | None, Query()] = None,
    cfg_scale: Annotated[float | None, Query()] = None,
    steps: Annotated[int | None, Query()] = None,
    seed: Annotated[int | None, Query(ge=-1, le=SEED_MAX)] = None,
    ref_audio_path: Annotated[str | None, Query()] = None,
    ref_text: Annotated[str | None, Query()] = None,
    response_format: Annotated[OutputFormat | None, Query()] = None,
    voice: Annotated[str | None, Query()] = None,
    normalize: Annotated[bool | None, Query()] = None,
) -> AudioStreamingResponse:
    """The same as POST, with the fields as query parameters (for `<audio src=...>`)."""
    arrived_at = time.time()
    given = {"text": text, "lora_name": lora_name, "cfg_scale": cfg_scale, "steps": steps, "seed": seed,
             "ref_audio_path": ref_audio_path, "ref_text": ref_text, "response_format": response_format,
             "voice": voice, "normalize": normalize}
    try:  # only what the client sent counts as set (a saved voice's defaults fill the rest)
        body = SynthesizeRequest(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("query", *e["loc"])} for e in exc.errors()]) from exc
    return await _respond(service, body, arrived_at)
