"""Axial-DeepLab in PyTorch."""
__version__ = "0.1.0"

from .models.registry import create_model, list_models  # noqa: E402,F401
