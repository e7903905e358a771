"""Cut an smp U-Net into two shards: the encoder, and the decoder with the segmentation head.

The cut follows the U-Net's own structure, so the two shards compute exactly what the
whole model computes: the encoder returns its feature pyramid, and the decoder takes the
skip features it concatenates. The encoder's first "feature" is the input image itself,
which the decoder only uses for its size; it is not sent (the decoder rebuilds an empty
placeholder of that size, twice the size of the first real feature — ResNet stems
downsample by 2).

The whole model checks that the input side is a multiple of the encoder's output stride
(32) in ``smp.Unet.forward``; the shards bypass that method, so
:class:`EncoderPart` checks it itself.

State dicts and optimizer states of the shards merge into those of the whole model (same
keys, same parameter order), so a distributed run's checkpoint loads as one plain module,
and resumes in either layout.
"""

from __future__ import annotations

from typing import Any

import segmentation_models_pytorch as smp
import torch
from segmentation_models_pytorch.encoders.resnet import ResNetEncoder
from torch import nn

from memtrain.errors import StrategyError

ENCODER = "encoder"
DECODER = "decoder"
PARTS = (ENCODER, DECODER)


def resnet_encoders() -> list[str]:
    return [name for name, spec in smp.encoders.encoders.items() if issubclass(spec["encoder"], ResNetEncoder)]


def check_splittable(encoder: str, strategy: str) -> None:
    """StrategyError unless ``encoder`` is a ResNet encoder (the split's stem and feature layout are known)."""
    names = resnet_encoders()
    if encoder not in names:
        raise StrategyError(f"--strategies {strategy}: the encoder/decoder split supports ResNet encoders ({', '.join(names)}); --encoder {encoder} is not one")


class ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    The decoder concatenates each skip feature with the upsampled path; the gradient of a
    concatenation input is a strided slice of the output gradient. Sent between processes
    (pipeline stages over gloo) such a gradient is refused ("tensors must be contiguous"),
    so the decoder shard passes every received feature through this function.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class EncoderPart(nn.Module):
    """The U-Net encoder: image -> skip features (all but the image itself), checking the /32 constraint."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        stride = self.encoder.output_stride
        h, w = x.shape[-2:]
        if h % stride or w % stride:
            raise ValueError(f"encoder shard: input of {h}x{w} px; the U-Net needs sides divisible by {stride}")
        return tuple(self.encoder(x)[1:])


class DecoderPart(nn.Module):
    """The U-Net decoder and segmentation head: skip features -> output image."""

    def __init__(self, decoder: nn.Module, segmentation_head: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder
        self.segmentation_head = segmentation_head

    def forward(self, *skips: torch.Tensor) -> torch.Tensor:
        skips = tuple(ContiguousGrad.apply(s) if s.requires_grad else s for s in skips)
        b, _, h, w = skips[0].shape
        # The decoder reads the full-resolution size from the first feature (the input image) and drops it.
        image_size = skips[0].new_empty((b, 0, 2 * h, 2 * w))
        return self.segmentation_head(self.decoder([image_size, *skips]))


def split_unet(model: nn.Module, strategy: str = "rpc") -> tuple[EncoderPart, DecoderPart]:
    """The two shards of an smp U-Net (after any single-process transforms); StrategyError for other models."""
    missing = [a for a in ("encoder", "decoder", "segmentation_head") if not isinstance(getattr(model, a, None), nn.Module)]
    if missing or getattr(model, "classification_head", None) is not None:
        raise StrategyError(
            f"--strategies {strategy}: can only split a U-Net with encoder, decoder and segmentation_head (and no classification head); "
            f"{model.__class__.__name__} has {'no ' + ', '.join(missing) if missing else 'a classification head'}"
        )
    return EncoderPart(model.encoder), DecoderPart(model.decoder, model.segmentation_head)


def shard_of(model: nn.Module, part: str, strategy: str = "rpc") -> nn.Module:
    encoder, decoder = split_unet(model, strategy)
    return encoder if part == ENCODER else decoder


# --------------------------------------------------------------------------- states


def merge_state_dicts(encoder: dict[str, Any], decoder: dict[str, Any]) -> dict[str, Any]:
    """The whole model's state dict from the shards' (keys are already the model's: encoder.*, decoder.*, segmentation_head.*)."""
    return {**encoder, **decoder}


def split_state_dict(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Inverse of :func:`merge_state_dicts`."""
    return {
        ENCODER: {k: v for k, v in state.items() if k.startswith("encoder.")},
        DECODER: {k: v for k, v in state.items() if not k.startswith("encoder.")},
    }


def merge_optimizer_states(encoder: dict[str, Any], decoder: dict[str, Any]) -> dict[str, Any]:
    """One optimizer state dict over the whole model's parameters (encoder first, as ``model.parameters()`` orders them)."""
    if len(encoder["param_groups"]) != 1 or len(decoder["param_groups"]) != 1:
        raise ValueError("expected one parameter group per shard")
    n_enc = len(encoder["param_groups"][0]["params"])
    n_dec = len(decoder["param_groups"][0]["params"])
    state = {int(i): s for i, s in encoder["state"].items()}
    state.update({n_enc + int(i): s for i, s in decoder["state"].items()})
    group = dict(encoder["param_groups"][0], params=list(range(n_enc + n_dec)))
    return {"state": state, "param_groups": [group]}


def split_optimizer_state(state: dict[str, Any], n_encoder_params: int) -> dict[str, dict[str, Any]]:
    """Inverse of :func:`merge_optimizer_states`, given the encoder shard's parameter count."""
    group = state["param_groups"][0]
    n_all = len(group["params"])
    enc = {"state": {i: s for i, s in state["state"].items() if int(i) < n_encoder_params}, "param_groups": [dict(group, params=list(range(n_encoder_params)))]}
    dec = {
        "state": {int(i) - n_encoder_params: s for i, s in state["state"].items() if int(i) >= n_encoder_params},
        "param_groups": [dict(group, params=list(range(n_all - n_encoder_params)))],
    }
    return {ENCODER: enc, DECODER: dec}
