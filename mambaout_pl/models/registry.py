"""Model names: our registered models, importable classes by dotted path, timm's models, and which names a file may use.

A name a user writes in their own code or recipe may be any import path. A name read from a file
the user does not control (an export's `config.json`, a checkpoint's hyper-parameters) is resolved
inside `untrusted_source(...)`: then only registered models, timm models, `nn.Module` classes of
`mambaout_pl` and the paths user code allowed with `allow_import_path` resolve, and nothing else is
imported.
"""

import contextlib
import difflib
import fnmatch
import functools
import importlib
import inspect
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar, overload

import timm
from torch import nn

from .weights import HF_HUB_PREFIX, CheckpointError, check_safetensors_file, download_pretrained, load_pretrained

__all__ = [
    "UnknownModelError",
    "UntrustedNameError",
    "ResolvedModel",
    "register_model",
    "list_models",
    "resolve_model",
    "create_model",
    "from_pretrained",
    "untrusted_source",
    "allow_import_path",
    "resolve_trusted_class",
]

ModelFactory = TypeVar("ModelFactory", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_ALLOWED_PATHS: set[str] = set()
# What the names being resolved come from when it is a file the user does not control; None: the user's own code.
_UNTRUSTED_SOURCE: ContextVar[str | None] = ContextVar("mambaout_pl_untrusted_source", default=None)
# Names inside an untrusted block that the user's own config also gives: they resolve as in the user's code.
_USER_NAMES: ContextVar[frozenset[str]] = ContextVar("mambaout_pl_user_names", default=frozenset())
_OWN_PACKAGE = "mambaout_pl"


class UnknownModelError(ValueError):
    """No registered model, importable class or timm model has the requested name."""


class UntrustedNameError(ValueError):
    """A name read from a file would import code that is neither ours, timm's, nor allowed by the user."""


class ResolvedModel(NamedTuple):
    """What a model name resolves to: where it was found and the callable that builds it."""

    kind: Literal["registered", "import_path", "timm"]
    factory: Callable[..., nn.Module]


@overload
def register_model(factory: ModelFactory) -> ModelFactory: ...


@overload
def register_model(
    factory: str | None = None, *, name: str | None = None
) -> Callable[[ModelFactory], ModelFactory]: ...


def register_model(factory=None, *, name=None):
    """Register a model function or `nn.Module` class so `create_model` builds it by name.

    Use as `@register_model` (the function or class name is the model name), or as
    `@register_model("my_net")` / `@register_model(name="my_net")`. Registering a name again
    replaces the earlier entry with a warning.
    """
    if isinstance(factory, str):
        factory, name = None, factory

    def _register(fn: ModelFactory) -> ModelFactory:
        if not callable(fn):
            raise TypeError(f"register_model expects a function or class, got {type(fn).__name__}.")
        model_name = name or fn.__name__
        previous = _MODELS.get(model_name)
        if previous is not None and previous is not fn:
            warnings.warn(
                f"Model '{model_name}' was already registered ({_qualified_name(previous)}); "
                f"replacing it with {_qualified_name(fn)}.",
                stacklevel=3,
            )
        _MODELS[model_name] = fn
        return fn

    return _register if factory is None else _register(factory)


def list_models(pattern: str | None = None) -> list[str]:
    """Names of the registered models (ours and user-registered), sorted, filtered by a glob pattern."""
    names = sorted(_MODELS)
    if pattern:
        names = fnmatch.filter(names, pattern)
    return names


@contextlib.contextmanager
def untrusted_source(source: str, user_names: Iterable[str] = ()) -> Iterator[None]:
    """Resolve every model and class name inside the block as read from `source`, a file the user does not control.

    Covers nested look-ups too (a segmentor building its backbone by name), in this thread or task.
    `user_names` are names the user's own config gives as well (e.g. a recipe's backbone class path
    that a checkpoint repeats): they resolve as in the user's own code.
    """
    token = _UNTRUSTED_SOURCE.set(source)
    names_token = _USER_NAMES.set(frozenset(name for name in user_names if isinstance(name, str)))
    try:
        yield
    finally:
        _USER_NAMES.reset(names_token)
        _UNTRUSTED_SOURCE.reset(token)


def allow_import_path(*paths: str) -> None:
    """Let names from files import these paths: a class or function (`my_pkg.nets.MyNet`) or a module
    (`my_pkg.nets`, whose classes of the expected base are then allowed). Call it from your own code."""
    for path in paths:
        if not isinstance(path, str) or not path or path.startswith(".") or ":" in path:
            raise ValueError(
                f"allow_import_path expects a dotted import path such as 'my_pkg.nets.MyNet', got {path!r}."
            )
        _ALLOWED_PATHS.add(path)


def resolve_trusted_class(path: str, base: type | None = None, source: str | None = None) -> type:
    """The class at `path`, a name read from `source` (a file): a class of `mambaout_pl`, a subclass of `base`
    in an allow-listed module, or an allow-listed path. Anything else raises `UntrustedNameError` without
    importing it."""
    source = source or _UNTRUSTED_SOURCE.get() or "a file"
    module_name = path.rpartition(".")[0] if isinstance(path, str) else ""
    if not module_name or not _may_import(path):
        raise UntrustedNameError(_untrusted_message(path, source))
    obj = _import_attribute(path)
    if obj is None:
        raise UnknownModelError(f"No module '{module_name}' can be imported for '{path}' (named by {source}).")
    if not isinstance(obj, type) or (base is not None and not issubclass(obj, base)):
        kind = f"a subclass of {base.__module__}.{base.__qualname__}" if base is not None else "a class"
        raise UntrustedNameError(f"'{path}' named by {source} is not {kind}.")
    if path not in _ALLOWED_PATHS and not _may_import(f"{obj.__module__}.{obj.__qualname__}"):
        raise UntrustedNameError(_untrusted_message(f"{obj.__module__}.{obj.__qualname__}", source))
    return obj


def resolve_model(name: str) -> ResolvedModel:
    """What `create_model(name)` builds; the one look-up of model names.

    In the user's own code: a registered model, then
    an importable class or function by dotted path, then a timm model (prefixed names such as
    `hf-hub:...` included). Inside `untrusted_source(...)`: a registered model, a timm model
    (`timm.is_model`), then only the import paths `resolve_trusted_class` accepts (and registered
    model functions); nothing else is imported.

    A timm-style pretrained tag (`mambaout_base_plus_rw.sw_e150_in12k`) is passed to a registered
    model function that takes `pretrained_cfg` (ours do, as timm's) and ignored by others.
    """
    if not isinstance(name, str) or not name:
        raise UnknownModelError(f"A model name must be a non-empty string, got {name!r}.")
    base_name = name.split(".", 1)[0]
    for registered in (name, base_name):
        if registered in _MODELS:
            factory = _MODELS[registered]
            if registered != name and _takes_argument(factory, "pretrained_cfg"):
                factory = functools.partial(factory, pretrained_cfg=name.split(".", 1)[1])
            return ResolvedModel("registered", factory)
    source = _UNTRUSTED_SOURCE.get()
    if source is not None and name not in _USER_NAMES.get():
        return _resolve_untrusted(name, base_name, source)

    factory = _import_factory(name)
    if factory is not None:
        return ResolvedModel("import_path", factory)
    if ":" in name or timm.is_model(base_name):
        return ResolvedModel("timm", functools.partial(timm.create_model, name, pretrained=False))
    raise UnknownModelError(_unknown_model_message(name))


def create_model(
    name: str,
    pretrained: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a model by name (see `resolve_model`), then load `pretrained` weights if given: a checkpoint
    file, an export folder, or a Hub repo `hf-hub:user/repo[@revision]` (see `load_pretrained`).

    Registered models and class paths are called with `kwargs`; timm models are built by
    `timm.create_model(name, pretrained=False, **kwargs)`. Our MambaOut variants load the weights
    themselves, before wrapping a `features_only=True` model; other models load them once built.
    """
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
        if pretrained is False:
            pretrained = None
        else:
            raise ValueError(
                f"pretrained must be the path of a checkpoint file or export folder, `hf-hub:user/repo` or None, "
                f"got {pretrained!r}."
            )
    resolved = resolve_model(name)
    if pretrained is not None and resolved.kind == "registered" and _loads_own_weights(resolved.factory):
        return resolved.factory(pretrained=pretrained, **kwargs)
    model = resolved.factory(**kwargs)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def from_pretrained(source: str | os.PathLike) -> nn.Module:
    """Build a model exported by `mambaout export` (a local folder or `hf-hub:user/repo`) and load it strictly.

    timm-format folders (`config.json` with `architecture`) are built by timm; mambaout-pl-format
    folders (`model_name`, `model_args`) by `create_model` inside `untrusted_source`, so the config's
    names, nested ones included, never import foreign code.
    """
    folder = download_pretrained(str(source)) if str(source).startswith(HF_HUB_PREFIX) else Path(source)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"No config.json in '{folder}': give a folder written by `mambaout export` (or its Hub repo)."
        )
    config = json.loads(config_file.read_text())
    label = f"'{config_file}'" + (f" (of {source})" if str(source).startswith(HF_HUB_PREFIX) else "")
    if "architecture" in config:
        architecture = config["architecture"]
        if not isinstance(architecture, str) or ":" in architecture or not timm.is_model(architecture):
            raise UnknownModelError(
                f"{label} names architecture {architecture!r}, which is not a timm model: a timm-format export is "
                "built only from timm's own models (timm.list_models()), so loading it never runs code it names."
            )
        weights = folder / "model.safetensors"
        if weights.is_file():
            check_safetensors_file(weights)  # timm's own reader would say only "incomplete metadata"
        return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    name = config.get("model_name")
    if not isinstance(name, str):
        raise CheckpointError(f"'{config_file}' names no `architecture` (timm) or `model_name` (mambaout-pl).")
    model_args = config.get("model_args", {})
    if not isinstance(model_args, dict):
        raise CheckpointError(f"'{config_file}': model_args must be a JSON object, got {type(model_args).__name__}.")
    with untrusted_source(label):
        model = create_model(name, **model_args)
    return load_pretrained(model, folder, strict=True).eval()


def _resolve_untrusted(name: str, base_name: str, source: str) -> ResolvedModel:
    if ":" not in name and timm.is_model(base_name):
        return ResolvedModel("timm", functools.partial(timm.create_model, name, pretrained=False))
    if "." not in name or ":" in name or not _may_import(name):
        if "." in name or ":" in name:
            raise UntrustedNameError(_untrusted_message(name, source))
        raise UnknownModelError(_unknown_model_message(name))
    if name in _ALLOWED_PATHS:
        factory = _import_factory(name)
        if factory is None:
            raise UnknownModelError(
                f"No module '{name.rpartition('.')[0]}' can be imported for '{name}' (named by {source})."
            )
        return ResolvedModel("import_path", factory)
    factory = _import_attribute(name)
    if factory is not None and any(factory is registered for registered in _MODELS.values()):
        return ResolvedModel("import_path", factory)
    return ResolvedModel("import_path", resolve_trusted_class(name, base=nn.Module, source=source))


def _takes_argument(factory: Callable[..., nn.Module], name: str) -> bool:
    """Whether `factory` declares a parameter `name` (a `**kwargs` catch-all does not count)."""
    try:
        parameter = inspect.signature(factory).parameters.get(name)
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)


def _loads_own_weights(factory: Callable[..., nn.Module]) -> bool:
    """Whether `factory` is one of our model functions taking a weights path as `pretrained`."""
    function = factory.func if isinstance(factory, functools.partial) else factory
    own = getattr(function, "__module__", "").startswith(_OWN_PACKAGE + ".")
    return own and _takes_argument(factory, "pretrained")


def _may_import(path: str) -> bool:
    """Whether a name from a file may import `path`: ours, an allowed path, or in an allowed module."""
    module_name = path.rpartition(".")[0]
    return (
        path in _ALLOWED_PATHS
        or module_name in _ALLOWED_PATHS
        or module_name == _OWN_PACKAGE
        or module_name.startswith(_OWN_PACKAGE + ".")
    )


def _import_attribute(path: str) -> Any:
    """The object at a dotted `module.attribute` path, or None if the module does not exist."""
    module_name, _, attr = path.rpartition(".")
    if not module_name or ":" in path:
        return None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # only a missing module of the path itself means "not a path"; a missing dependency of it is an error
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            return None
        raise
    if not hasattr(module, attr):
        raise UnknownModelError(f"Module '{module_name}' has no attribute '{attr}' (from model name '{path}').")
    return getattr(module, attr)


def _import_factory(path: str) -> Callable[..., nn.Module] | None:
    """The callable at a dotted path, or None if the module does not exist."""
    factory = _import_attribute(path)
    if factory is not None and not callable(factory):
        raise UnknownModelError(f"'{path}' is a {type(factory).__name__}, not a model class or function.")
    return factory


def _untrusted_message(value: Any, source: str) -> str:
    message = (
        f"Refusing {value!r} from {source}: names read from a file resolve only against registered models "
        "(mambaout_pl.models.list_models()), timm models and classes of mambaout_pl, so that loading a file "
        "never runs code it names. "
    )
    if isinstance(value, str) and ":" in value:
        return message + "A prefixed name (hf-hub:, local-dir:) is built only when your own code names it."
    return message + (
        f"If you trust it, allow it in your own code before loading: mambaout_pl.models.allow_import_path({value!r}) "
        f"(`mambaout export` and `mambaout push`: --allow-import-path {value})."
    )


def _unknown_model_message(name: str) -> str:
    candidates = {c.lower(): c for c in timm.list_models() + list_models()}
    close = difflib.get_close_matches(name.lower(), candidates, n=5, cutoff=0.6)
    message = f"Unknown model '{name}'."
    if close:
        message += " Did you mean " + ", ".join(f"'{candidates[c]}'" for c in close) + "?"
    if "." in name and ":" not in name:
        message += f" No module '{name.rpartition('.')[0]}' could be imported for it as a class path."
    message += (
        " Our models are listed by mambaout_pl.models.list_models(), timm's by timm.list_models('pattern*'); "
        "a custom model can be registered with @register_model or named by its import path ('my_pkg.nets.MyNet')."
    )
    return message


def _qualified_name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
