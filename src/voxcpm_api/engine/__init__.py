"""Synthesis engines. `base` (no torch) defines the seam; `voxcpm_engine` drives the official package."""
