"""Token mixers by name, as layer factories a Gated CNN block calls with its channel count."""

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .attention import AttentionMixer
from .gated_conv import DepthwiseConvMixer
from .ssm import SelectiveScanMixer

__all__ = [
    "TOKEN_MIXERS",
    "MixerLayer",
    "MixerSpec",
    "mixer_layer",
    "mixer_arguments",
    "create_mixer",
    "stage_mixers",
]

TOKEN_MIXERS: dict[str, type[nn.Module]] = {
    "gated_conv": DepthwiseConvMixer,
    "ssm": SelectiveScanMixer,
    "attention": AttentionMixer,
}

# A mixer name (a key of TOKEN_MIXERS) or a callable `(dim) -> nn.Module`, like timm's `norm_layer`.
MixerLayer = str | Callable[..., nn.Module]

_HINTS = {
    "causal": "for 'ssm' the scan sets causality: scan='raster' is causal, 'bidirectional' and 'cross' are not",
    "window_size": "windows apply to 'attention' only",
}


def mixer_arguments(token_mixer: str) -> list[str]:
    """Names of the keyword arguments the mixer `token_mixer` takes (besides `dim`)."""
    _check_mixer_name(token_mixer)
    parameters = inspect.signature(TOKEN_MIXERS[token_mixer].__init__).parameters
    return [name for name in parameters if name not in ("self", "dim")]


@dataclass(frozen=True)
class MixerSpec:
    """A built-in token mixer and its arguments; `spec(dim)` builds it over `dim` channels."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        accepted = mixer_arguments(self.name)
        unknown = [key for key in self.args if key not in accepted]
        if unknown:
            raise ValueError(
                f"token_mixer '{self.name}' takes no argument {', '.join(repr(k) for k in unknown)}; "
                f"it takes {', '.join(accepted)}."
            )

    def with_defaults(self, **defaults: Any) -> "MixerSpec":
        """This spec, with `defaults` filling the arguments it leaves unset and its mixer takes."""
        accepted = mixer_arguments(self.name)
        filled = {key: value for key, value in defaults.items() if key in accepted and key not in self.args}
        return MixerSpec(self.name, {**self.args, **filled}) if filled else self

    def __call__(self, dim: int) -> nn.Module:
        return TOKEN_MIXERS[self.name](dim, **self.args)


def mixer_layer(token_mixer: MixerLayer, **defaults: Any) -> Callable[[int], nn.Module]:
    """The layer factory `(dim) -> nn.Module` of a mixer name, a `MixerSpec` or any callable.

    `defaults` (the block's `kernel_size`) fill the arguments a name or `MixerSpec` leaves unset;
    any other callable builds its mixer as it is.
    """
    if isinstance(token_mixer, str):
        return MixerSpec(token_mixer).with_defaults(**defaults)
    if isinstance(token_mixer, MixerSpec):
        return token_mixer.with_defaults(**defaults)
    if callable(token_mixer):
        return token_mixer
    raise ValueError(
        f"token_mixer must be one of {', '.join(repr(m) for m in TOKEN_MIXERS)}, a MixerSpec or a callable "
        f"(dim) -> nn.Module, got {token_mixer!r}."
    )


def create_mixer(token_mixer: MixerLayer, dim: int, **kwargs: Any) -> nn.Module:
    """Build the token mixer `token_mixer` (a key of `TOKEN_MIXERS`, or a layer factory) over `dim` channels."""
    if isinstance(token_mixer, str):
        return MixerSpec(token_mixer, kwargs)(dim)
    return token_mixer(dim, **kwargs)


def stage_mixers(
    num_stages: int,
    token_mixer: MixerLayer | Sequence[MixerLayer] = "gated_conv",
    mixer_args: dict[str, Any] | None = None,
) -> list[Callable[[int], nn.Module]]:
    """The mixer layer factory of each stage: a `MixerSpec` per named mixer, callables as given.

    `token_mixer` and every value of `mixer_args` is either one value for all stages or a list
    with one entry per stage (None: the mixer's default). A single value applies to the stages
    whose named mixer takes it, and must fit at least one; a list entry must fit its own stage.
    """
    layers = _per_stage("token_mixer", token_mixer, num_stages)
    for index, layer in enumerate(layers):
        if not callable(layer):
            _check_mixer_name(layer, f" (stage {index})" if num_stages > 1 and not isinstance(token_mixer, str) else "")
    names = [layer if isinstance(layer, str) else None for layer in layers]
    stage_args: list[dict[str, Any]] = [{} for _ in layers]
    for key, value in (mixer_args or {}).items():
        values = _per_stage(key, value, num_stages)
        takers = [i for i, name in enumerate(names) if name is not None and key in mixer_arguments(name)]
        if not any(v is not None for v in values):
            continue
        if not takers:
            users = [name for name in TOKEN_MIXERS if key in mixer_arguments(name)]
            message = (
                f"{key}={value!r} does not apply to token_mixer {_describe(layers)}: "
                f"only {', '.join(repr(u) for u in users) or 'no mixer'} take{'s' if len(users) == 1 else ''} it"
            )
            if key in _HINTS:
                message += f" ({_HINTS[key]})"
            raise ValueError(message + ". Choose a token_mixer that takes it, or leave it unset.")
        for index, stage_value in enumerate(values):
            if stage_value is None:
                continue
            if index in takers:
                stage_args[index][key] = stage_value
            elif isinstance(value, (list, tuple)):
                raise ValueError(
                    f"{key}[{index}]={stage_value!r}, but stage {index} uses token_mixer {_describe([layers[index]])}, "
                    f"which takes no {key}: give None for that stage."
                )
    return [MixerSpec(layer, args) if isinstance(layer, str) else layer for layer, args in zip(layers, stage_args)]


def _per_stage(key: str, value: Any, num_stages: int) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != num_stages:
            raise ValueError(
                f"{key} has {len(value)} entries {list(value)} but the model has {num_stages} stages: "
                "give one entry per stage, or a single value for all stages."
            )
        return list(value)
    return [value] * num_stages


def _check_mixer_name(name: Any, where: str = "") -> None:
    if not isinstance(name, str) or name not in TOKEN_MIXERS:
        raise ValueError(
            f"Unknown token_mixer {name!r}{where}, expected one of {', '.join(repr(m) for m in TOKEN_MIXERS)}."
        )


def _describe(layers: list[MixerLayer]) -> str:
    labels = [
        layer if isinstance(layer, str) else getattr(layer, "name", None) or _qualified(layer) for layer in layers
    ]
    unique = list(dict.fromkeys(labels))
    return repr(unique[0]) if len(unique) == 1 else repr(labels)


def _qualified(layer: Any) -> str:
    target = getattr(layer, "func", layer)
    return getattr(target, "__qualname__", type(target).__name__)
