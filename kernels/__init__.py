"""STAR module in three layers: the streaming state (state.py), the PyTorch reference
(reference.py), and StarModule with its backend switch (module.py) between that reference and the
fused Triton kernel (star_triton.py, which needs only state.py).

`StarModule(backend="auto")` runs the kernel on CUDA where Triton imports and the reference
elsewhere. The Triton names below are imported on first access, so `import star_kernels` works
without Triton.
"""

from .module import BACKENDS, StarModule
from .reference import causal_pool
from .state import EMPTY_MAX, StarState, empty_state

_TRITON_NAMES = (
    "LaunchSettings", "StarFunction", "StarWeights", "Tiles", "fused_forward", "fused_step", "module_weights",
    "star_backward", "star_forward", "star_step",
)

__all__ = ["BACKENDS", "EMPTY_MAX", "StarModule", "StarState", "causal_pool", "empty_state", *_TRITON_NAMES]


def __getattr__(name: str):
    if name in _TRITON_NAMES:
        from . import star_triton

        return getattr(star_triton, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
