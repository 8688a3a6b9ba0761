"""Importing weights trained elsewhere: a TensorFlow 2 checkpoint reader (no TensorFlow needed)
and the mappings from deeplab2's variables onto our models (``axial-deeplab convert``)."""

from .tf_checkpoint import TFCheckpointError, list_tf_checkpoint, read_tf_checkpoint  # noqa: F401
