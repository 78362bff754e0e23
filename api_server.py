#!/usr/bin/env python3
"""`python api_server.py` starts the server with default settings (env twins VOXCPM_* apply).

The application itself lives in src/voxcpm_api; `create_app` is re-exported for embedding.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from voxcpm_api.api.app import create_app  # noqa: E402,F401
from voxcpm_api.cli import main  # noqa: E402

if __name__ == "__main__":
    main([])
