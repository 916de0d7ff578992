"""Model registry: our models by name, any importable class by dotted path, and timm's models."""
import difflib
import fnmatch
import importlib
import os
import warnings
from typing import Any, Callable, Dict, List, Optional, TypeVar, Union, overload

import timm
from torch import nn

from .pretrained import load_pretrained

__all__ = ['UnknownModelError', 'register_model', 'list_models', 'create_model']

ModelFactory = TypeVar('ModelFactory', bound=Callable[..., nn.Module])

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


class UnknownModelError(ValueError):
    """No registered model, importable class or timm model has the requested name."""


@overload
def register_model(factory: ModelFactory) -> ModelFactory: ...


@overload
def register_model(factory: Optional[str] = None, *, name: Optional[str] = None) -> Callable[[ModelFactory], ModelFactory]: ...


def register_model(factory=None, *, name=None):
    """Register a model function or `nn.Module` class so `create_model` builds it by name.

    Use as `@register_model` (the function or class name is the model name), or as
    `@register_model('my_net')` / `@register_model(name='my_net')`. Registering a name again
    replaces the earlier entry with a warning.
    """
    if isinstance(factory, str):
        factory, name = None, factory

    def _register(fn: ModelFactory) -> ModelFactory:
        if not callable(fn):
            raise TypeError(f'register_model expects a function or class, got {type(fn).__name__}.')
        model_name = name or fn.__name__
        previous = _MODELS.get(model_name)
        if previous is not None and previous is not fn:
            warnings.warn(f"Model '{model_name}' was already registered ({_qualified_name(previous)}); "
                          f'replacing it with {_qualified_name(fn)}.', stacklevel=3)
        _MODELS[model_name] = fn
        return fn

    return _register if factory is None else _register(factory)


def list_models(pattern: Optional[str] = None) -> List[str]:
    """Names of the registered models (ours and user-registered), sorted, filtered by a glob pattern."""
    names = sorted(_MODELS)
    if pattern:
        names = fnmatch.filter(names, pattern)
    return names


def create_model(
        name: str,
        pretrained: Optional[Union[str, os.PathLike]] = None,
        **kwargs: Any,
) -> nn.Module:
    """Build a model by name, then load `pretrained` weights if given: a checkpoint file, an export
    folder, or a Hub repo `hf-hub:user/repo[@revision]` (see `load_pretrained`).

    `name` is looked up in this order:
      1. a registered model (`list_models()`); a timm-style tag (`mambaout_tiny.in1k`) is ignored,
         weights come only from `pretrained`;
      2. an importable class or function by dotted path (`my_pkg.nets.MyNet`), called with `kwargs`;
      3. a timm model (`timm.list_models()`), including prefixed names such as `hf-hub:...`, built
         by `timm.create_model(name, pretrained=False, **kwargs)`.
    """
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
        if pretrained is False:
            pretrained = None
        else:
            raise ValueError(
                f'pretrained must be the path of a checkpoint file or export folder, `hf-hub:user/repo` or None, '
                f'got {pretrained!r}.'
            )

    model = _build(name, **kwargs)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def _build(name: str, **kwargs: Any) -> nn.Module:
    base_name = name.split('.', 1)[0]
    for registered in (name, base_name):
        if registered in _MODELS:
            return _MODELS[registered](**kwargs)

    factory = _import_factory(name)
    if factory is not None:
        return factory(**kwargs)

    if ':' in name or timm.is_model(base_name):
        return timm.create_model(name, pretrained=False, **kwargs)

    raise UnknownModelError(_unknown_model_message(name))


def _import_factory(path: str) -> Optional[Callable[..., nn.Module]]:
    """The object at a dotted `module.attribute` path, or None if the module does not exist."""
    module_name, _, attr = path.rpartition('.')
    if not module_name or ':' in path:
        return None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # only a missing module of the path itself means "not a path"; a missing dependency of it is an error
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + '.')):
            return None
        raise
    if not hasattr(module, attr):
        raise UnknownModelError(f"Module '{module_name}' has no attribute '{attr}' (from model name '{path}').")
    factory = getattr(module, attr)
    if not callable(factory):
        raise UnknownModelError(f"'{path}' is a {type(factory).__name__}, not a model class or function.")
    return factory


def _unknown_model_message(name: str) -> str:
    candidates = {c.lower(): c for c in timm.list_models() + list_models()}
    close = difflib.get_close_matches(name.lower(), candidates, n=5, cutoff=0.6)
    message = f"Unknown model '{name}'."
    if close:
        message += ' Did you mean ' + ', '.join(f"'{candidates[c]}'" for c in close) + '?'
    if '.' in name and ':' not in name:
        message += f" No module '{name.rpartition('.')[0]}' could be imported for it as a class path."
    message += (
        " Our models are listed by mambaout_pl.models.list_models(), timm's by timm.list_models('pattern*'); "
        "a custom model can be registered with @register_model or named by its import path ('my_pkg.nets.MyNet')."
    )
    return message


def _qualified_name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
