"""The network: segmentation-models-pytorch U-Net, one input channel, one output channel.

Encoders start from random weights; nothing is ever downloaded. ``encoder_weights``
may name a local state-dict file (e.g. torchvision ResNet weights saved with
``torch.save(model.state_dict(), path)``); it is loaded with ``weights_only=True`` so
no pickled code runs, RGB first-layer kernels are summed to one channel (as smp does
for pretrained weights), and any key mismatch is an error.

The output convolution (the segmentation head) starts at zero by default (``--zero-head``): the
first outputs are a constant 0, the first step moves only the head, and the network starts
from "predict a flat image" rather than from smp's random output. With pytorch-msssim's loss
(``--loss msssim:reference``) this was a crutch: a random head gives outputs uncorrelated with
the targets, some scale's contrast term comes out negative, its ReLU makes the product — and
its gradient — exactly zero, and training never starts. memtrain's own loss (the default, see
:mod:`memtrain.loss`) has no such dead zone, so ``--no-zero-head`` (smp's initialisation) trains
from the first step too; the default stays at zero so that published runs and presets keep
their figures.
"""

from __future__ import annotations

from pathlib import Path

import segmentation_models_pytorch as smp
import torch
from torch import nn

from memtrain.config import ModelConfig
from memtrain.errors import CheckpointError, ConfigError


def build_model(cfg: ModelConfig) -> nn.Module:
    names = smp.encoders.get_encoder_names()
    if cfg.encoder not in names:
        resnets = ", ".join(n for n in names if n.startswith("resnet"))
        raise ConfigError(f"--encoder {cfg.encoder}: unknown smp encoder (ResNet encoders: {resnets}; all: smp.encoders.get_encoder_names())")
    model = smp.Unet(encoder_name=cfg.encoder, encoder_weights=None, in_channels=1, classes=1, activation=None)
    if cfg.encoder_weights:
        load_encoder_weights(model.encoder, cfg.encoder_weights)
    if cfg.zero_head:
        head = model.segmentation_head[0]
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    return model


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load a local encoder state dict into ``encoder``; CheckpointError naming the file otherwise."""
    path = Path(path).expanduser()
    flag = f"--encoder-weights {path}"
    if not path.is_file():
        raise CheckpointError(f"{flag}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{flag}: not a loadable weights-only state dict ({e.__class__.__name__}: {str(e).splitlines()[0][:160]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{flag}: expected a state dict (parameter name -> tensor)")
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in ("module.", "model.", "encoder."):
            key = key.removeprefix(prefix)
        if key.startswith("fc."):  # classifier head of torchvision ResNets; the encoder has none
            continue
        cleaned[key] = value
    own = encoder.state_dict()
    first = "conv1.weight"
    if first in cleaned and first in own and cleaned[first].shape[1] != own[first].shape[1]:
        if own[first].shape[1] != 1:
            raise CheckpointError(f"{flag}: {first} has {cleaned[first].shape[1]} input channels, the encoder expects {own[first].shape[1]}")
        cleaned[first] = cleaned[first].sum(dim=1, keepdim=True)
    parts = state_dict_mismatch(own, cleaned)
    if parts:
        raise CheckpointError(f"{flag}: does not match the {encoder.__class__.__name__} encoder: " + "; ".join(parts))
    encoder.load_state_dict(cleaned)


def state_dict_mismatch(own: dict[str, torch.Tensor], given: dict[str, torch.Tensor], *, skip_shape: tuple[str, ...] = ()) -> list[str]:
    """How ``given`` differs from a module's ``own`` state_dict, as short phrases (empty when it loads strictly).

    Keys starting with one of ``skip_shape`` may differ in shape (buffers their module resizes on load).
    """
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    mismatched = [k for k in own if k in given and tuple(given[k].shape) != tuple(own[k].shape) and not k.startswith(skip_shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if mismatched:
        k = mismatched[0]
        parts.append(f"{len(mismatched)} of another shape (e.g. {k}: {tuple(given[k].shape)} vs {tuple(own[k].shape)})")
    return parts
