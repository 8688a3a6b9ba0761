"""Models: Axial-ResNet backbones, Panoptic/Axial-DeepLab, and the registry.

The model modules are imported here, eagerly, so that their ``@register_model`` builders are
in the registry whichever of ``axial_deeplab``, ``axial_deeplab.models`` or
``axial_deeplab.models.registry`` was imported first (importing a submodule runs this file).
The registry itself imports no model module.
"""

from . import axial_resnet, axial_swidernet, max_deeplab, panoptic_deeplab  # noqa: F401,E402  (register the built-in models)
from .registry import create_model, is_model, list_models, register_model  # noqa: F401
from .timm_registry import register_if_timm_imported, register_timm_models  # noqa: E402,F401

register_if_timm_imported()  # axial_deeplab.* in timm's registry when timm is already imported
