"""Every filesystem path a client can influence is resolved here, and only here.

Clients name reference audio relative to one of the --ref-audio-dir roots and download files by
bare name. Absolute paths, `..`, symlinks that escape a root, and names this service did not
write are refused, so no request can read an arbitrary server file (the seed's worst bug).
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

from .errors import FileMissing, Forbidden, InvalidInput

AUDIO_FILE_RE = re.compile(r"^tts_[0-9a-f]{8,32}_\d{9,12}\.(mp3|wav|flac|opus|pcm)$")
UPLOADS_DIR_NAME = "uploads"


def new_task_id() -> str:
    return uuid.uuid4().hex[:12]


def audio_file_name(task_id: str, extension: str) -> str:
    """The seed's naming scheme: tts_<task id>_<unix seconds>.<ext>."""
    return f"tts_{task_id}_{int(time.time())}.{extension}"


def display_path(output_dir: Path, file_name: str) -> str:
    """`api_outputs/tts_x_1.mp3` as the seed reports it (the output dir as configured, then the name)."""
    return f"{output_dir.as_posix().rstrip('/')}/{file_name}" if output_dir.as_posix() != "." else file_name


def resolve_reference_audio(name: str, roots: list[Path]) -> Path:
    """Resolve a client-supplied reference audio name inside the allowed roots.

    Raises Forbidden for absolute paths, traversal or escaping symlinks; FileMissing when the file
    is in no root.
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidInput("ref_audio_path must be a non-empty string", field="ref_audio_path")
    if "\x00" in name:
        raise Forbidden("ref_audio_path contains a NUL byte", field="ref_audio_path")
    relative = Path(name)
    if relative.is_absolute() or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise Forbidden(
            "ref_audio_path must be relative to a reference audio directory (--ref-audio-dir); absolute paths "
            "are not allowed", field="ref_audio_path")
    if ".." in relative.parts or "\\" in name:
        raise Forbidden("ref_audio_path must not contain '..' or backslashes", field="ref_audio_path")
    for root in roots:
        root_resolved = root.resolve()
        try:
            candidate = (root_resolved / relative).resolve()
            inside = root_resolved in candidate.parents
            found = inside and candidate.is_file()
        except (OSError, RuntimeError):  # a name too long for the filesystem, a symlink loop: nothing there
            inside, found = True, False
        if not inside:
            raise Forbidden("ref_audio_path resolves outside the reference audio directories",
                            field="ref_audio_path")
        if found:
            return candidate
    raise FileMissing(
        f"reference audio '{name}' not found in the reference audio directories "
        f"({', '.join(str(r) for r in roots)})", field="ref_audio_path")


def resolve_download(output_dir: Path, file_name: str) -> Path:
    """Only names matching our own output pattern, directly inside output_dir.

    A symlink there that leads out of output_dir is answered like a missing file, whether or not
    its target exists.
    """
    if not AUDIO_FILE_RE.fullmatch(file_name or ""):
        raise FileMissing("file not found")
    root = output_dir.resolve()
    path = root / file_name
    try:
        found = path.resolve().parent == root and path.is_file()
    except (OSError, RuntimeError):  # a symlink loop
        found = False
    if not found:
        raise FileMissing("file not found")
    return path
