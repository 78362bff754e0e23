#!/usr/bin/env python3
"""Start the VoxCPM LoRA TTS API server. `python start_api.py --help` lists the flags."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from voxcpm_api.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
