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
from timm.utils import ParseKwargs
from torch import nn

PREFIX = "timm/"


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
    else kept as text). Raises ``ValueError`` naming an item that is not ``key=value``."""
    for item in items:
        if "=" not in item or not item.split("=", 1)[0]:
            raise ValueError(f"--model-kwargs: {item!r} is not key=value; write e.g. img_size=8")
    namespace = argparse.Namespace()
    ParseKwargs(option_strings=[], dest="kwargs")(None, namespace, list(items))
    return namespace.kwargs


def create_timm_model(name: str, num_classes: int, input_shape: Sequence[int] | None = None,
                      **kwargs: Any) -> nn.Module:
    """``timm.create_model(NAME, pretrained=False, num_classes=num_classes, **kwargs)`` for
    ``name`` = ``timm/NAME``, with ``in_chans`` and ``img_size`` from ``input_shape`` ``(C, H, W)``
    unless ``kwargs`` gives them. Input ``(B, C, H, W)``; output logits ``(B, num_classes)``.
    Raises ``ValueError`` for an unknown name (see ``timm_name``)."""
    bare = timm_name(name)
    data = {}
    if input_shape is not None and len(input_shape) == 3:
        data = {"in_chans": input_shape[0], "img_size": tuple(input_shape[1:])}
    build = {**data, **kwargs}
    try:
        return timm.create_model(bare, pretrained=False, num_classes=num_classes, **build)
    except TypeError as err:
        # Convolutional families (ResNet, ConvNeXt, EfficientNet) take any image size and have
        # no img_size argument; timm offers no way to ask a model class beforehand.
        if "img_size" in kwargs or "img_size" not in build or "'img_size'" not in str(err):
            raise
        del build["img_size"]
        return timm.create_model(bare, pretrained=False, num_classes=num_classes, **build)


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
