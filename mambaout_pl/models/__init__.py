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
]
