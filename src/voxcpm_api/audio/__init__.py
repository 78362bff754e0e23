"""Audio helpers: container encoding, chunk crossfading and atomic file writes.

Everything here works on mono ``float32`` numpy arrays and in-memory buffers;
no model or torch code lives in this package.
"""
