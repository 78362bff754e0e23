"""VoxCPM speech-synthesis server: hot-switched LoRA adapters, durable tasks, seed-exact audio."""

__version__ = "0.1.0"
