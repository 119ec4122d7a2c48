"""Replay, the synthetic city, the live demo and benchmarks."""
