"""Axial-DeepLab in PyTorch."""

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "create_model",
    "is_model",
    "list_models",
    "load_model",
    "Predictor",
    "PanopticResult",
    "keep_freed_memory",
]

_REGISTRY_NAMES = ("create_model", "is_model", "list_models")
_INFERENCE_NAMES = ("load_model", "Predictor", "PanopticResult")


def __getattr__(name):
    # On first use, so that importing the package (or a light submodule such as errors) does
    # not import torch; axial_deeplab.models registers every built-in model when imported.
    if name in _REGISTRY_NAMES:
        from . import models

        return getattr(models, name)
    if name in _INFERENCE_NAMES:
        from . import inference

        return getattr(inference, name)
    if name == "keep_freed_memory":
        from .cpu_memory import keep_freed_memory

        return keep_freed_memory
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
