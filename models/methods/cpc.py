"""Contrastive Predictive Coding: van den Oord, Li, Vinyals, "Representation Learning with
Contrastive Predictive Coding", 2018. https://arxiv.org/abs/1807.03748

Over the frames of a clip (sec. 2, Figure 1, with frames as the steps of the sequence):

    z_t = g_enc(x_t)                   the backbone on frame t, then a linear map to ``embed_dim``
    c_t = g_ar(z_<=t)                  a GRU over z_1..z_t (``context_dim``), causal
    f_k(x_{t+k}, c_t) = exp(z_{t+k}^T W_k c_t)      k = 1..``prediction_steps``   (eq. 3)

trained with InfoNCE (eq. 4, :func:`models.losses.cpc_info_nce_loss`): the prediction W_k c_t must
pick z_{t+k} among the z of every position of every clip in the global batch (other clips and
other positions of the same clip are the negatives).

Context positions: the paper does not pin down which t predict; here *every* t with t + k < T
does (each clip gives T - k terms for step k, as CPC v2 does over image patches), which uses the
whole clip instead of one random t per clip and costs only a matrix product more. The loss is the
mean over k of eq. 4 averaged over those (clip, t). T must exceed ``prediction_steps``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ssl_foundry.models.losses import cpc_info_nce_loss
from ssl_foundry.models.registry import register_method
from ssl_foundry.models.video import clip_batch, encode_frames, require_frames


@register_method("cpc")
class CPC(nn.Module):
    """CPC over frame sequences: g_enc = backbone + linear, g_ar = one-layer GRU, one linear W_k
    per prediction step (log-bilinear scores, no normalisation or temperature, as eq. 3)."""

    input_kind = "clip"
    num_views = 1

    def __init__(self, backbone: nn.Module, embed_dim: int = 256, context_dim: int = 256, prediction_steps: int = 3):
        super().__init__()
        if prediction_steps < 1:
            raise ValueError(f"cpc: model.method_args.prediction_steps must be >= 1, got {prediction_steps}")
        self.backbone = backbone
        self.encoder_head = nn.Linear(backbone.num_features, embed_dim)  # g_enc's output layer
        self.context = nn.GRU(embed_dim, context_dim, batch_first=True)  # g_ar
        self.predictors = nn.ModuleList(nn.Linear(context_dim, embed_dim, bias=False)
                                        for _ in range(prediction_steps))  # W_1 .. W_K
        self.prediction_steps = prediction_steps
        self.min_frames = self.frames_needed({"prediction_steps": prediction_steps})

    @staticmethod
    def frames_needed(args: dict) -> int:
        """t = 0 predicts t + K, so T >= K + 1."""
        return args["prediction_steps"] + 1

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        clips = clip_batch(views, "cpc")[0]
        require_frames("cpc", clips.shape[1], self.min_frames,
                       f"predicting prediction_steps={self.prediction_steps} frames ahead",
                       "model.method_args.prediction_steps")
        z = self.encoder_head(encode_frames(self.backbone, clips))  # (B, T, embed_dim)
        c, _ = self.context(z)  # (B, T, context_dim): c_t sees z_1..z_t only
        predictions = torch.stack([w(c) for w in self.predictors], dim=2)  # (B, T, K, embed_dim): W_k c_t
        return {"loss": cpc_info_nce_loss(predictions, z)}
