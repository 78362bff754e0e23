#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels that bench/device_run.sh installs on a GPU machine without it
# (Python 3.12 and torch from its image; voxcpm and the few runtime packages it imports are missing there).
#
#   bash bench/device_wheels.sh        -> .whl/ (git-ignored; carry it: [".whl"], ~20 MB)
#
# voxcpm without its dependencies for the reason the Makefile gives; pydantic-core's wheels are tagged
# manylinux2014, the others manylinux_2_28.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
mkdir -p "$dest"
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$dest" "$@"; }
get --platform manylinux_2_28_x86_64 voxcpm==2.0.3 librosa==0.11.0 soundfile soxr audioread pooch decorator \
  platformdirs pydantic==2.14.4 annotated-types typing-inspection pydantic-settings python-dotenv
get --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 pydantic-core==2.50.5
ls "$dest"
