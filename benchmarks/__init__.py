"""Benchmarks of xdsl's generated training steps against hand-written PyTorch (`python -m benchmarks.run`)."""

__all__: list[str] = []
