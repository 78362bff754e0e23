#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels that bench/device_run.sh installs on a GPU machine without it
# (Python 3.12 and torch from its image; voxcpm, the server's packages and the few runtime packages that voxcpm
# imports are missing there).
#
#   bash bench/device_wheels.sh        -> .whl/ (git-ignored; carry it: [".whl"], ~42 MB)
#
# voxcpm without its dependencies for the reason the Makefile gives; pydantic-core's and cffi's wheels are tagged
# manylinux2014, the others manylinux_2_28 (or older tags that pip also accepts for it).
#
# The server (bench/bench_serve.py starts start_api.py): fastapi and what it imports that the image lacks
# (starlette, annotated-doc, opentelemetry-api, typing-inspection), uvicorn with httptools (uvicorn[standard]'s
# HTTP parser, what users get, ~0.5 MB; websockets and watchfiles are left out: no route uses WebSockets and
# --dev reload is not benchmarked), python-multipart (the upload routes need it at import), soundfile and
# cffi/pycparser (WAV files through its bundled libsndfile), av (PyAV, 36 MB: its wheel bundles FFmpeg).
# All of it comes to ~42 MB, under the ~45 MB the 64 MiB carry limit leaves beside the repo (~5.5 MB).
# If av ever has to go: the server starts and serves WAV and PCM without it, files and streams alike
# (audio/streaming.py imports av lazily, only for MP3/Opus/AAC/FLAC streams, AAC files and `speed`; WAV
# and PCM streams are written by our own code, files by soundfile); bench_serve.py asks for WAV only.
# The image already has anyio, sniffio, idna, h11, click, typing-extensions, prometheus-client, pyyaml, uvloop.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
mkdir -p "$dest"
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$dest" "$@"; }
get --platform manylinux_2_28_x86_64 voxcpm==2.0.3 librosa==0.11.0 soundfile==0.14.0 soxr==1.1.0 audioread pooch \
  decorator platformdirs pydantic==2.14.4 annotated-types typing-inspection pydantic-settings==2.16.3 python-dotenv \
  fastapi==0.165.0 starlette==1.10.0 annotated-doc opentelemetry-api uvicorn==0.54.0 httptools==0.9.0 \
  python-multipart==0.0.34 pycparser av==18.1.0
get --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 pydantic-core==2.50.5 cffi==2.0.0
ls "$dest"
du -ch "$dest"/*.whl | tail -1
