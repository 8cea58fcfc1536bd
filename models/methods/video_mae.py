"""VideoMAE: Tong, Song, Wang, Wang, "VideoMAE: Masked Autoencoders are Data-Efficient Learners for
Self-Supervised Video Pre-Training", NeurIPS 2022. https://arxiv.org/abs/2203.12602
(the image MAE it extends: He et al. 2022, :mod:`models.methods.mae`).

Space-time masked autoencoding with *tube masking* (VideoMAE's): one random spatial mask per
clip, shared by all its frames, with a very high ratio (0.9 by default, as the paper), so a
masked patch cannot be copied from the same place in a neighbouring frame. The encoder's blocks
attend jointly over the visible tokens of all frames; a lightweight decoder of timm ``Block``s
reconstructs the masked patches of every frame, and the loss is MAE's: mean squared error on
per-patch normalised pixels, over masked patches only.

Tubelets of one frame. VideoMAE embeds 2 x 16 x 16 tubelets with a 3-D convolution. Here every
frame is patchified by the ViT's own 2-D ``patch_embed`` and a temporal position embedding, owned
by this method, is added to the ViT's spatial ``pos_embed``: the trained encoder is then a plain
timm image ``VisionTransformer`` (its state dict loads into ``timm.create_model`` with nothing
left over), usable on single frames and on images -- which is what this pipeline exports and
evaluates. A 2-frame tubelet would need a 3-D patch embedding that timm's ViT lacks, and the
exported model would no longer run on an image. The price is T times as many tokens for the
decoder (the encoder sees only the 10 % visible ones), and neighbouring frames are not merged
into one token, which the high tube-masking ratio already makes hard to exploit.

Token order is frame-major: token ``t * N + n`` is patch ``n`` (row-major, as timm) of frame ``t``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ssl_foundry.models.backbones import sincos_1d_pos_embed, sincos_pos_embed
from ssl_foundry.models.losses import mae_loss
from ssl_foundry.models.methods.mae import (build_decoder, check_vit_encoder, encode_visible, init_mae_weights,
                                            patchify, restore_with_mask_tokens, run_decoder, split_pos_embed)
from ssl_foundry.models.registry import register_method
from ssl_foundry.models.video import clip_batch

TEMPORAL_POS = ("sincos", "learn")


def tube_masking(x: torch.Tensor, frames: int, mask_ratio: float, noise: torch.Tensor | None = None):
    """Tube masking: the same random spatial mask for every frame of a clip.

    ``x``: (B, T * N, D) tokens in frame-major order. Keeps ``round((1 - mask_ratio) * N)`` patch
    positions per clip (those with the smallest ``noise``, (B, N) uniform by default) in every
    frame, and returns, like :func:`models.methods.mae.random_masking`,
    ``(x_visible, mask, ids_restore)``: ``x_visible`` (B, T * N_keep, D), frame-major; ``mask``
    (B, T * N), 1 = removed; ``ids_restore`` (B, T * N) with
    ``gather(cat([x_visible, removed]), 1, ids_restore) == x``. With T = 1 it is random_masking.
    """
    batch, length, dim = x.shape
    patches = length // frames
    len_keep = round(patches * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(batch, patches, device=x.device)
    ids_spatial = torch.argsort(noise, dim=1)  # (B, N) ascending: the smallest noise is kept
    offsets = (torch.arange(frames, device=x.device) * patches).view(1, frames, 1)
    keep = (offsets + ids_spatial[:, None, :len_keep]).flatten(1)  # (B, T * N_keep)
    drop = (offsets + ids_spatial[:, None, len_keep:]).flatten(1)
    ids_shuffle = torch.cat([keep, drop], dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x_visible = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(batch, length, device=x.device)
    mask[:, :keep.shape[1]] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_visible, mask, ids_restore


@register_method("video_mae")
class VideoMAE(nn.Module):
    """Tube-masked autoencoder over the frames of a clip, on a timm image ViT (tubelets of 1 frame).

    ``temporal_pos_embed``: ``"sincos"`` (default) a fixed 1-D sin-cos embedding of the frame index
    (any T), ``"learn"`` a learned one for up to ``max_frames`` frames. The decoder's positions are
    fixed: 2-D sin-cos of the patch plus 1-D sin-cos of the frame. The ViT's spatial ``pos_embed``
    is set to fixed 2-D sin-cos and frozen, and weights are initialised as the image MAE's.
    """

    input_kind = "clip"
    num_views = 1

    def __init__(self, backbone: nn.Module, mask_ratio: float = 0.9, decoder_embed_dim: int = 384,
                 decoder_depth: int = 4, decoder_num_heads: int = 6, mlp_ratio: float = 4.0,
                 norm_pix_loss: bool = True, temporal_pos_embed: str = "sincos", max_frames: int = 64):
        super().__init__()
        check_vit_encoder(backbone, "video_mae")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"video_mae: model.method_args.mask_ratio must be in (0, 1), got {mask_ratio} "
                             f"(VideoMAE uses 0.9)")
        if temporal_pos_embed not in TEMPORAL_POS:
            raise ValueError(f"video_mae: model.method_args.temporal_pos_embed must be one of "
                             f"{', '.join(TEMPORAL_POS)}, got '{temporal_pos_embed}'")
        self.backbone = backbone
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = backbone.patch_embed.patch_size[0]
        self.in_chans = backbone.patch_embed.proj.in_channels
        self.num_prefix = backbone.num_prefix_tokens
        grid = backbone.patch_embed.grid_size
        self.num_patches = grid[0] * grid[1]
        self.max_frames = max_frames
        self.decoder_embed_dim = decoder_embed_dim

        learned = nn.Parameter(torch.zeros(max_frames, backbone.embed_dim)) if temporal_pos_embed == "learn" else None
        self.register_parameter("temporal_pos_embed", learned)
        self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred = build_decoder(
            backbone.embed_dim, decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio,
            self.patch_size ** 2 * self.in_chans)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        # fixed 2-D sin-cos of the patch for the decoder (the frame's 1-D sin-cos is added per T)
        self.register_buffer("decoder_spatial_pos", sincos_pos_embed(grid, decoder_embed_dim)[0], persistent=False)
        init_mae_weights(self, backbone, [self.mask_token, self.temporal_pos_embed])
        self.min_frames = 1  # one frame is an image MAE with a temporal position 0

    def _temporal(self, frames: int, dim: int, learned: torch.Tensor | None, device) -> torch.Tensor:
        if learned is not None:
            if frames > self.max_frames:
                raise ValueError(f"video_mae: the learned temporal position embedding covers max_frames="
                                 f"{self.max_frames} frames, got clips of T={frames}: lower data.clip_frames to "
                                 f"{self.max_frames} or fewer, or raise model.method_args.max_frames")
            return learned[:frames]
        return sincos_1d_pos_embed(frames, dim).to(device)

    def forward_encoder(self, clips: torch.Tensor, noise: torch.Tensor | None = None):
        vit = self.backbone
        batch, frames = clips.shape[:2]
        prefix_pos, patch_pos = split_pos_embed(vit)
        x = vit.patch_embed(clips.flatten(0, 1)) + patch_pos  # (B * T, N, D): spatial positions
        temporal = self._temporal(frames, x.shape[-1], self.temporal_pos_embed, x.device)  # (T, D)
        x = (x.unflatten(0, (batch, frames)) + temporal[None, :, None].to(x.dtype)).flatten(1, 2)  # (B, T*N, D)
        x, mask, ids_restore = tube_masking(x, frames, self.mask_ratio, noise)
        return encode_visible(vit, x, prefix_pos), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor, frames: int) -> torch.Tensor:
        x = restore_with_mask_tokens(self.decoder_embed(latent), ids_restore, self.mask_token, self.num_prefix)
        temporal = self._temporal(frames, self.decoder_embed_dim, None, x.device)  # (T, Dd)
        pos = (self.decoder_spatial_pos[None] + temporal[:, None]).flatten(0, 1)  # (T * N, Dd)
        x = x + torch.cat([pos.new_zeros(self.num_prefix, pos.shape[1]), pos]).to(x.dtype)  # prefix tokens: 0
        return run_decoder(self.decoder_blocks, self.decoder_norm, self.decoder_pred, x, self.num_prefix)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        clips = clip_batch(views, "video_mae")[0]
        batch, frames = clips.shape[:2]
        keep = round(self.num_patches * (1 - self.mask_ratio))
        if keep < 1:
            raise ValueError(f"video_mae: mask_ratio={self.mask_ratio} keeps no patch of the {self.num_patches} "
                             f"of a frame: lower model.method_args.mask_ratio or use smaller patches")
        latent, mask, ids_restore = self.forward_encoder(clips)
        pred = self.forward_decoder(latent, ids_restore, frames)  # (B, T * N, p*p*C)
        target = patchify(clips.flatten(0, 1), self.patch_size).unflatten(0, (batch, frames)).flatten(1, 2)
        return {"loss": mae_loss(pred, target, mask, self.norm_pix_loss)}
