"""Models: MambaOut, the visual Mamba models it is compared with, a registry that also reaches timm's models, and checkpoint loading."""

from .backbones import FeatureBackbone
from .detector import RCNNDetector
from .inference import segment, slide_inference, whole_inference
from .mambaout import MambaOut
from .mambavision import MambaVision
from .mixers import MixerSpec
from .registry import (
    UnknownModelError,
    UntrustedNameError,
    allow_import_path,
    create_model,
    from_pretrained,
    list_models,
    register_model,
    resolve_model,
    resolve_trusted_class,
    untrusted_source,
)
from .segmentor import UperNetSegmentor
from .upernet import FCNHead, UperNetHead
from .vim import VisionMamba
from .vmamba import VSSM
from .weights import (
    CheckpointError,
    CheckpointMismatchError,
    UnsafeCheckpointError,
    load_pretrained,
    read_state_dict,
)

__all__ = [
    "MambaOut",
    "VisionMamba",
    "MambaVision",
    "VSSM",
    "create_model",
    "list_models",
    "register_model",
    "resolve_model",
    "untrusted_source",
    "allow_import_path",
    "resolve_trusted_class",
    "UntrustedNameError",
    "MixerSpec",
    "load_pretrained",
    "from_pretrained",
    "read_state_dict",
    "UnknownModelError",
    "CheckpointError",
    "CheckpointMismatchError",
    "UnsafeCheckpointError",
    "FeatureBackbone",
    "UperNetHead",
    "FCNHead",
    "UperNetSegmentor",
    "RCNNDetector",
    "segment",
    "slide_inference",
    "whole_inference",
]
