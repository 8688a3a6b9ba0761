"""Models: Axial-ResNet backbones, Panoptic/Axial-DeepLab, and the registry."""
from .registry import create_model, is_model, list_models, register_model  # noqa: F401
