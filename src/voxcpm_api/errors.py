"""The service's one exception tree.

    VoxError                       500  base; never raised directly
    ├── InvalidInput               422  a request field is wrong (names the field)
    │   ├── BadAudio               400  reference audio exists but cannot be decoded
    │   └── AdapterMismatch        422  a LoRA adapter does not fit the loaded base model
    ├── Forbidden                  403  a path outside the allowed roots
    ├── Unauthorized               401  missing or wrong API key
    ├── NotFound                   404
    │   ├── LoRANotFound
    │   ├── TaskNotFound
    │   └── FileMissing            (reference audio or download)
    ├── Conflict                   409  e.g. cancelling a finished task
    ├── Overloaded                 429  queue full (carries retry_after_s)
    ├── NotReady                   503  the model is still loading
    └── EngineFailure              500  the engine failed on valid input
        └── TaskCancelled          raised inside the engine to stop a generation at a patch boundary

Inner layers raise these; `api/errors.py` alone maps them to HTTP. Each class carries its
status code so the mapping is one table, and `field` so 4xx bodies name the culprit.
"""

from __future__ import annotations


class VoxError(Exception):
    status_code: int = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(VoxError):
    status_code = 422


class BadAudio(InvalidInput):
    status_code = 400


class AdapterMismatch(InvalidInput):
    status_code = 422


class Forbidden(VoxError):
    status_code = 403


class Unauthorized(VoxError):
    status_code = 401


class NotFound(VoxError):
    status_code = 404


class LoRANotFound(NotFound):
    pass


class TaskNotFound(NotFound):
    pass


class FileMissing(NotFound):
    pass


class Conflict(VoxError):
    status_code = 409


class Overloaded(VoxError):
    status_code = 429

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(VoxError):
    status_code = 503


class EngineFailure(VoxError):
    status_code = 500


class TaskCancelled(EngineFailure):
    status_code = 409
