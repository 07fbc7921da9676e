"""STAR module: the PyTorch reference (reference.py) and the fused Triton kernel (star_triton.py).

`StarModule(backend="auto")` runs the kernel on CUDA where Triton imports and the reference
elsewhere. The Triton names below are imported on first access, so `import star_kernels` works
without Triton.
"""

from .reference import BACKENDS, EMPTY_MAX, StarModule, StarState, causal_pool, empty_state

_TRITON_NAMES = (
    "StarFunction", "StarWeights", "fused_forward", "fused_step", "module_weights",
    "star_backward", "star_forward", "star_step",
)

__all__ = ["BACKENDS", "EMPTY_MAX", "StarModule", "StarState", "causal_pool", "empty_state", *_TRITON_NAMES]


def __getattr__(name: str):
    if name in _TRITON_NAMES:
        from . import star_triton

        return getattr(star_triton, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
