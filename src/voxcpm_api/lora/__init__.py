"""LoRA adapter discovery and validation (pure Python; the engine owns the tensors)."""
