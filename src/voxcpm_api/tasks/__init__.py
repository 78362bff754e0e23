"""Durable task bookkeeping and the engine-owner runner. Nothing in this package imports torch."""
