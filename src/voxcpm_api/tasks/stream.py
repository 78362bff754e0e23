"""A streamed synthesis: audio handed from the engine thread to the event loop patch by patch.

`EngineRunner.stream(params)` builds an `AudioStream`. Its producer coroutine takes a slot of the
runner's engine gate (the one tasks take: on a plain engine a stream and a task never generate at
the same time; on a ConcurrentEngine the stream is one batch row among the tasks'), runs the chunks
in the engine thread (or its own row thread), and every decoded patch crosses to the event loop
through `loop.call_soon_threadsafe` into a queue bounded by a semaphore of `max_buffered` slots:
when the consumer lags that far behind, the engine thread waits (polling for cancellation) instead
of buffering without limit. `max_buffered=None` (ConcurrentEngine: its audio callbacks run on the
loop thread every row shares, which must never wait for one client) buffers without a bound.

The consumer iterates the stream (`async for samples in stream`). `close()` — a client gone,
a response torn down — sets a threading.Event that makes the engine's audio callback raise
TaskCancelled at the next patch, so the generation stops there and the gate is released; it never
awaits, so it is safe in `finally` blocks of cancelled coroutines. Errors of the generation
(VoxError) are raised to the consumer by the iteration that would have returned the next audio.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from ..domain import SynthesisParams
from ..errors import EngineFailure, TaskCancelled, VoxError
from .progress import ShutdownRequested

if TYPE_CHECKING:
    from .runner import EngineRunner

log = logging.getLogger("voxcpm_api.stream")

DEFAULT_MAX_BUFFERED = 256  # patches (about 20 s of audio at 80 ms a patch) before the engine waits
SLOT_POLL_INTERVAL_S = 0.1
_END = object()


class ClientGone(TaskCancelled):
    """Raised in the engine thread at the next patch after the consumer closed the stream."""


class AudioStream:
    """Async iterator of float32 mono sample blocks at `sample_rate_hz`, made as they are generated."""

    def __init__(self, runner: EngineRunner, params: SynthesisParams, sample_rate_hz: int, *,
                 arrived_at: float | None = None, max_buffered: int | None = DEFAULT_MAX_BUFFERED) -> None:
        self.params = params
        self.sample_rate_hz = sample_rate_hz
        self.patches = 0  # set when the generation completes
        self.samples_out = 0  # samples handed to the consumer so far
        self.samples_made = 0  # samples the engine produced (written by the engine thread only)
        self.outcome: str | None = None  # completed | failed | cancelled, once the producer is done
        self._runner = runner
        self._arrived_at = arrived_at if arrived_at is not None else time.time()
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._slots = threading.Semaphore(max(1, max_buffered)) if max_buffered is not None else None
        self._cancel = threading.Event()
        self._closed = False
        self._first_reported = False
        self.finished = asyncio.Event()  # set when the producer is done and the gate is free again
        self._producer = asyncio.create_task(self._produce(), name="voxcpm-stream")

    # ---- consumer side (event loop) -----------------------------------------------------------

    def __aiter__(self) -> AudioStream:
        return self

    async def __anext__(self) -> np.ndarray:
        if self._closed:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            self._closed = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._closed = True
            raise item
        if self._slots is not None:
            self._slots.release()
        assert isinstance(item, np.ndarray)
        self.samples_out += item.size
        if not self._first_reported:
            self._first_reported = True
            self._runner._events.first_audio("stream", time.time() - self._arrived_at,  # noqa: SLF001
                                             self.params.lora_name, self.params.voice)
        return item

    def close(self) -> None:
        """Stop: the generation ends at its next patch. Never blocks, never awaits; idempotent."""
        self._closed = True
        self._cancel.set()

    async def aclose(self) -> None:
        self.close()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # ---- producer side ------------------------------------------------------------------------

    def _emit(self, samples: np.ndarray) -> None:
        """Engine thread: hand one block to the loop, waiting for a free slot if the consumer lags."""
        while self._slots is not None and not self._slots.acquire(timeout=SLOT_POLL_INTERVAL_S):
            if self._cancel.is_set():
                raise ClientGone("the client went away")
            if self._runner._shutdown.is_set():  # noqa: SLF001 - a stalled reader must not block shutdown
                raise ShutdownRequested("server is shutting down")
        if self._cancel.is_set():
            raise ClientGone("the client went away")
        self.samples_made += samples.size
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, samples)
        except RuntimeError as exc:  # the event loop is closed: nobody can receive this any more
            raise ClientGone("the event loop is closed") from exc

    async def _produce(self) -> None:
        runner = self._runner
        events = runner._events  # noqa: SLF001
        lora, voice = self.params.lora_name, self.params.voice
        started: float | None = None
        outcome = "failed"
        try:
            async with runner._gate:  # noqa: SLF001 - generations at once, tasks included
                if self._cancel.is_set():
                    outcome = "cancelled"
                    self._queue.put_nowait(ClientGone("the client went away"))
                    return
                started = time.monotonic()
                events.generation_started("stream", lora, voice)
                self.patches = int(await runner._in_row_thread(  # type: ignore[call-overload]  # noqa: SLF001
                    lambda: runner._stream_blocking(self.params, self._emit, self._cancel)))  # noqa: SLF001
            outcome = "completed"
            self._queue.put_nowait(_END)
        except TaskCancelled as exc:  # client gone, or the server is shutting down
            outcome = "cancelled"
            self._queue.put_nowait(exc)
        except VoxError as exc:
            log.info("stream failed: %s", exc.message)
            self._queue.put_nowait(exc)
        except asyncio.CancelledError:
            outcome = "cancelled"
            self._queue.put_nowait(TaskCancelled("the server is shutting down"))
            raise
        except Exception as exc:  # the consumer must always get an answer
            log.exception("stream crashed the engine call")
            self._queue.put_nowait(EngineFailure(f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            self.outcome = outcome
            if started is not None:
                events.generation_finished("stream", outcome, self.samples_made / self.sample_rate_hz,
                                           time.monotonic() - started, lora, voice)
            self.finished.set()
