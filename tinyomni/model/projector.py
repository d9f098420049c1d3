"""From encoder features to decoder embeddings: InternVL's pixel shuffle and the MLP projector.

`pixel_shuffle` trades spatial resolution for channels (0.5: a quarter of the tokens, four times the
width); `MultiModalProjector` then maps each token to the decoder's hidden size. Parameter names are
transformers' `InternVLMultiModalProjector` names, so InternVL projector weights load as they are.
`LinearProjector` is Idefics3 / SmolVLM's connector after its pixel shuffle (which is this same
`pixel_shuffle` with scale 1/scale_factor: the same view/permute sequence, measured equal for 2, 3, 4).
"""

from __future__ import annotations

import torch
from torch import nn

from tinyomni.errors import InputError
from tinyomni.model.activations import get_activation


def pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """[N, h, w, C] → [N, h·s, w·s, C/s²], identical to InternVL's `pixel_shuffle` (ps_version "v2").

    Each output token concatenates the channels of a (1/s)×(1/s) block of neighbouring patches.
    The view/permute sequence is kept exactly as InternVL's so the channel order (and therefore
    the projector's first weight matrix) matches their checkpoints.
    """
    if x.dim() != 4:
        raise InputError(f"pixel_shuffle expects [N, h, w, C] features, got shape {tuple(x.shape)}")
    n, h, w, c = x.shape
    k = round(1 / scale_factor)
    if not (0 < scale_factor <= 1) or abs(k * scale_factor - 1) > 1e-9:
        raise InputError(f"pixel_shuffle scale_factor must be 1/k for an integer k >= 1, got {scale_factor}")
    if h % k or w % k:
        raise InputError(
            f"pixel_shuffle with scale_factor {scale_factor} needs a feature grid divisible by {k}, "
            f"got {h}x{w} (h x w)"
        )
    # InternVL names the second axis "w" and the third "h"; the operations below are theirs verbatim.
    x = x.reshape(n, h, w // k, c * k)
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, w // k, h // k, c * k * k)
    return x.permute(0, 2, 1, 3).contiguous()


class MultiModalProjector(nn.Module):
    """LayerNorm(in) (optional) → Linear(in, hidden) → activation (GELU) → Linear(hidden, out); hidden
    defaults to out."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_features: int | None = None,
        layer_norm_eps: float = 1e-5,
        hidden_act: str = "gelu",
        layer_norm: bool = True,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or out_features
        # LLaVA's projector has no LayerNorm (then there is no `layer_norm` parameter to load).
        self.layer_norm: nn.Module = nn.LayerNorm(in_features, eps=layer_norm_eps) if layer_norm else nn.Identity()
        self.linear_1 = nn.Linear(in_features, hidden_features)
        self.linear_2 = nn.Linear(hidden_features, out_features)
        self.act = get_activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


class LinearProjector(nn.Module):
    """One Linear(in, out) (ProjectorConfig.kind "linear"): Idefics3's `modality_projection.proj` without a
    bias, Qwen2-Audio's `multi_modal_projector.linear` with one."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)
