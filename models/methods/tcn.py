"""Time-Contrastive Networks, single-view: Sermanet, Lynch, Chebotar, Hsu, Jang, Schaal, Levine,
"Time-Contrastive Networks: Self-Supervised Learning from Video", ICRA 2018.
https://arxiv.org/abs/1704.06888

Single-view TCN: within one video, a frame near the anchor in time is its positive
and frames far from it are negatives, so the embedding has to tell apart what changes over time
(pose, interaction) while ignoring what stays (background, appearance).

Frame sampling, per clip, from its T frames (torch RNG, so a seed reproduces it):
  - anchor a: uniform over the frames that have at least one frame ``negative_margin`` or more
    away (with T > 2 * negative_margin that is every frame);
  - positive p: uniform over the frames with 1 <= |p - a| <= ``positive_window``;
  - negatives: the frames with |n - a| >= ``negative_margin``; ``loss="triplet"`` draws one of
    them uniformly (the paper's triplet), ``loss="infonce"`` uses all of them.
Frame distances are in frames of the clip (evenly spaced in time by the loader), so the windows
scale with data.clip_frames and the clip duration, not with the video's fps.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ssl_foundry.models.heads import MLPHead
from ssl_foundry.models.losses import tcn_info_nce_loss, tcn_triplet_loss
from ssl_foundry.models.registry import register_method
from ssl_foundry.models.video import clip_batch, encode_frames, require_frames, select_frames

LOSSES = ("infonce", "triplet")


def _uniform_choice(allowed: torch.Tensor) -> torch.Tensor:
    """One index per row, uniform over the True entries of ``allowed`` (B, T) (torch RNG)."""
    return torch.multinomial(allowed.float(), 1).squeeze(1)


def sample_tcn_frames(batch: int, frames: int, positive_window: int, negative_margin: int,
                      device: torch.device | str = "cpu"):
    """Anchor, positive and one negative frame index per clip (each (B,)), and the mask (B, T) of
    every frame far enough from its clip's anchor to be a negative (see the module docstring)."""
    t = torch.arange(frames, device=device)
    has_negative = ((t[None, :] - t[:, None]).abs() >= negative_margin).any(dim=1)  # (T,)
    anchor = _uniform_choice(has_negative.expand(batch, frames))
    distance = (t[None, :] - anchor[:, None]).abs()  # (B, T)
    positive = _uniform_choice((distance >= 1) & (distance <= positive_window))
    far = distance >= negative_margin
    negative = _uniform_choice(far)
    return anchor, positive, negative, far


@register_method("tcn")
class TCN(nn.Module):
    """Single-view TCN: backbone -> embedding head -> L2-normalised embedding (the paper's
    embedding lives on the unit hypersphere), trained with

    - ``loss="triplet"`` (the paper's loss): for every clip one triplet (anchor, positive,
      negative), ``[||f(a) - f(p)||^2 - ||f(a) - f(n)||^2 + margin]_+``; margin 0.2 by default,
      FaceNet's (Schroff et al. 2015), whose triplet loss TCN takes;
    - ``loss="infonce"`` (default; the multi-pair generalisation of the triplet, N-pairs of Sohn
      2016, written as InfoNCE with a ``temperature`` on the normalised embeddings): every anchor
      against all positives of the global batch (the other clips' positives are its negatives)
      plus all far frames of its own clip.

    The embedding head is an MLP (``proj_layers`` linear layers, BN + ReLU between them) to
    ``embed_dim`` (32 in the paper); the paper's head is conv layers + spatial softmax + an FC
    layer on an Inception trunk, here the pooled features of any timm backbone feed the MLP.
    With ``infonce`` every frame of the clip goes through the backbone (the far frames are the
    negatives); with ``triplet`` only the three sampled frames per clip do.
    """

    input_kind = "clip"
    num_views = 1

    def __init__(self, backbone: nn.Module, loss: str = "infonce", positive_window: int = 1,
                 negative_margin: int = 2, margin: float = 0.2, temperature: float = 0.1,
                 embed_dim: int = 32, proj_hidden_dim: int = 512, proj_layers: int = 2):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"tcn: model.method_args.loss must be one of {', '.join(LOSSES)}, got '{loss}'")
        if positive_window < 1:
            raise ValueError(f"tcn: model.method_args.positive_window must be >= 1 frame, got {positive_window}")
        if negative_margin <= positive_window:
            raise ValueError(f"tcn: model.method_args.negative_margin ({negative_margin}) must be larger than "
                             f"positive_window ({positive_window}), or a frame could be both positive and negative")
        if margin < 0:
            raise ValueError(f"tcn: model.method_args.margin must be >= 0, got {margin}")
        if temperature <= 0:
            raise ValueError(f"tcn: model.method_args.temperature must be > 0, got {temperature}")
        self.backbone = backbone
        self.projector = MLPHead(backbone.num_features, proj_hidden_dim, embed_dim, proj_layers)
        self.loss = loss
        self.positive_window = positive_window
        self.negative_margin = negative_margin
        self.margin = margin
        self.temperature = temperature
        self.min_frames = self.frames_needed({"negative_margin": negative_margin})

    @staticmethod
    def frames_needed(args: dict) -> int:
        """An anchor at frame 0 needs a negative at frame negative_margin."""
        return args["negative_margin"] + 1

    def embed(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, K, C, H, W) frames -> (B, K, embed_dim) embeddings (normalised by the losses)."""
        return self.projector(encode_frames(self.backbone, clips).flatten(0, 1)).unflatten(0, clips.shape[:2])

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        clips = clip_batch(views, "tcn")[0]
        batch, frames = clips.shape[:2]
        require_frames("tcn", frames, self.min_frames,
                       f"a negative at least negative_margin={self.negative_margin} frames from the anchor",
                       "model.method_args.negative_margin")
        anchor, positive, negative, far = sample_tcn_frames(batch, frames, self.positive_window,
                                                            self.negative_margin, clips.device)
        if self.loss == "triplet":
            z = self.embed(select_frames(clips, torch.stack([anchor, positive, negative], dim=1)))
            return {"loss": tcn_triplet_loss(z[:, 0], z[:, 1], z[:, 2], self.margin)}
        z = self.embed(clips)  # (B, T, D): every frame, the far ones are the anchor's clip negatives
        rows = torch.arange(batch, device=clips.device)
        return {"loss": tcn_info_nce_loss(z[rows, anchor], z[rows, positive], z, far, self.temperature)}
