"""The engine's device path: a static-shape decode step, its CUDA graphs, batched token choice."""
