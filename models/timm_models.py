"""Any timm model as ``timm/NAME``: built by ``timm.create_model`` without pretrained weights.

timm names are case- and spelling-exact (``timm/vit_tiny_patch16_224``), unlike the zoo's. A
timm model fits every dataset: it takes the data's channels (``in_chans``, which every timm
model takes) and, where its class takes one, image size (``img_size``: ViT, DeiT, Swin, ...).
Keyword arguments given (``--model-kwargs img_size=8 patch_size=2``) win over both.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from typing import Any

import timm
import torch
from timm.utils import ParseKwargs
from torch import nn

PREFIX = "timm/"
RESERVED_KWARGS = ("pretrained", "num_classes")  # never pretrained; the data's class count


class ModelError(ValueError):
    """A model that cannot be built as asked (bad ``--model-kwargs``, input it cannot take):
    bad input, reported in one line."""


def is_timm(name: str) -> bool:
    """Whether ``name`` names a timm model (``timm/NAME``)."""
    return name.startswith(PREFIX)


def timm_name(name: str) -> str:
    """The timm name of ``timm/NAME``. Raises ``ValueError`` (one line, the closest timm names)
    when timm has no such model."""
    bare = name[len(PREFIX):]
    known = timm.list_models()
    if bare not in known:
        near = difflib.get_close_matches(bare, known, n=3)
        hint = f"did you mean {', '.join(PREFIX + n for n in near)}?" if near else "timm.list_models() lists them"
        raise ValueError(f"Unknown timm model {bare!r} in --model {name}; {hint}")
    return bare


def parse_model_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """``("img_size=8", "patch_size=2")`` -> ``{"img_size": 8, "patch_size": 2}``, as timm's
    train.py parses ``--model-kwargs`` (its ``ParseKwargs``: each value ``ast.literal_eval``-ed,
    else kept as text). Raises ``ValueError`` naming an item that is not ``key=value``, a key
    given twice, or one of ``RESERVED_KWARGS``."""
    seen = set()
    for item in items:
        if "=" not in item or not item.split("=", 1)[0]:
            raise ValueError(f"--model-kwargs: {item!r} is not key=value; write e.g. img_size=8")
        key = item.split("=", 1)[0]
        if key in seen:  # timm's ParseKwargs would keep the last silently
            raise ValueError(f"--model-kwargs: {key} is given twice; keep one {key}=...")
        seen.add(key)
    namespace = argparse.Namespace()
    ParseKwargs(option_strings=[], dest="kwargs")(None, namespace, list(items))
    for key in RESERVED_KWARGS:
        if key in namespace.kwargs:
            raise ValueError(f"--model-kwargs: {key} is set by itop_dist (no pretrained weights; the "
                             f"data's class count); remove {key}={namespace.kwargs[key]!r}")
    return namespace.kwargs


def create_timm_model(name: str, num_classes: int, input_shape: Sequence[int] | None = None,
                      **kwargs: Any) -> nn.Module:
    """``timm.create_model(NAME, pretrained=False, num_classes=num_classes, **kwargs)`` for
    ``name`` = ``timm/NAME``, with ``in_chans`` and ``img_size`` from ``input_shape`` ``(C, H, W)``
    unless ``kwargs`` gives them. Input ``(B, C, H, W)``; output logits ``(B, num_classes)``.
    The built model runs one zero input of ``input_shape`` (eval mode, no gradients), so that a
    model that cannot take the data is refused here, not at the first step. Raises
    ``ValueError`` (one line) for an unknown name (see ``timm_name``), for ``kwargs`` timm does
    not accept (an unknown key, a value of the wrong type) and for a model that does not take
    ``input_shape``."""
    bare = timm_name(name)
    data = {}
    if input_shape is not None and len(input_shape) == 3:
        data = {"in_chans": input_shape[0], "img_size": tuple(input_shape[1:])}
    build = {**data, **kwargs}
    given = " ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "none"
    try:
        try:
            model = timm.create_model(bare, pretrained=False, num_classes=num_classes, **build)
        except TypeError as err:
            # Convolutional families (ResNet, ConvNeXt, EfficientNet) take any image size and
            # have no img_size argument; timm offers no way to ask a model class beforehand.
            if "img_size" in kwargs or "img_size" not in build or "'img_size'" not in str(err):
                raise
            del build["img_size"]
            model = timm.create_model(bare, pretrained=False, num_classes=num_classes, **build)
    except (TypeError, ValueError, AssertionError) as err:
        raise ModelError(f"--model-kwargs: timm cannot build {bare} with --model-kwargs {given}: "
                         f"{_first_line(err)}") from err
    if data:
        _check_input(model, bare, tuple(input_shape), given)
    return model


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _check_input(model: nn.Module, bare: str, input_shape: tuple[int, ...], given: str) -> None:
    """One forward of a zero input of ``input_shape`` (C, H, W); raises ModelError (one line)
    naming the data's shape when the model rejects it (patch larger than the image, an
    img_size or in_chans that differs from the data's)."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    except (RuntimeError, AssertionError, ValueError) as err:
        c, h, w = input_shape
        raise ModelError(f"--model: timm/{bare} (--model-kwargs {given}) does not take the data's "
                         f"{c}x{h}x{w} images ({_first_line(err)}); set img_size={h} in_chans={c} and a "
                         f"patch_size that divides {h} in --model-kwargs") from err
    finally:
        model.train(training)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """FSDP units of a timm model: each transformer block (``model.blocks``: ViT, DeiT, ...),
    else each stage (``model.stages``: ConvNeXt, ...; ``layer1..4``: ResNet), else none (the
    root alone shards everything). Patch embedding, tokens, final norm and head stay with the
    root, as the stem and classifier of the zoo's CNNs do."""
    for attr in ("blocks", "stages"):
        container = getattr(model, attr, None)
        if isinstance(container, (nn.Sequential, nn.ModuleList)) and len(container):
            return list(container)
    return [getattr(model, f"layer{i}") for i in range(1, 5) if isinstance(getattr(model, f"layer{i}", None), nn.Module)]
