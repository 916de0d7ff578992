"""Models: MambaOut, a registry that also reaches timm's models, and checkpoint loading."""
from .registry import UnknownModelError, create_model, list_models, register_model
from .mambaout import MambaOut
from .pretrained import (
    CheckpointError,
    CheckpointMismatchError,
    UnsafeCheckpointError,
    from_pretrained,
    load_pretrained,
    read_state_dict,
)
from .backbones import FeatureBackbone
from .upernet import FCNHead, UperNetHead
from .segmentor import UperNetSegmentor
from .detector import RCNNDetector
from .inference import segment, slide_inference, whole_inference

__all__ = [
    'MambaOut',
    'create_model',
    'list_models',
    'register_model',
    'load_pretrained',
    'from_pretrained',
    'read_state_dict',
    'UnknownModelError',
    'CheckpointError',
    'CheckpointMismatchError',
    'UnsafeCheckpointError',
    'FeatureBackbone',
    'UperNetHead',
    'FCNHead',
    'UperNetSegmentor',
    'RCNNDetector',
    'segment',
    'slide_inference',
    'whole_inference',
]
