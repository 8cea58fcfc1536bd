"""MAE: He, Chen, Xie, Li, Dollár, Girshick, "Masked Autoencoders Are Scalable Vision Learners",
CVPR 2022. https://arxiv.org/abs/2111.06377

Laid out like the reference ``models_mae.py`` (random_masking, forward_encoder, forward_decoder,
loss), but the encoder is the timm ``VisionTransformer`` the trainer exports: it is run on the
visible patches only through its own ``patch_embed``, ``pos_embed``, class token, ``blocks`` and
final norm, so the exported backbone is a plain timm ViT. Decoder blocks are timm ``Block``s.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block, VisionTransformer

from ssl_foundry.models.backbones import freeze_sincos_pos_embed, is_vit, sincos_pos_embed
from ssl_foundry.models.losses import mae_loss
from ssl_foundry.models.registry import register_method


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), patches in row-major order (as timm's patch_embed), pixels
    of a patch in (row, column, channel) order."""
    n, c, h, w = imgs.shape
    gh, gw = h // patch_size, w // patch_size
    x = imgs.reshape(n, c, gh, patch_size, gw, patch_size)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, gh * gw, patch_size * patch_size * c)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: (N, L, p*p*C) -> (N, C, H, W)."""
    n, (gh, gw), p = x.shape[0], grid_size, patch_size
    x = x.reshape(n, gh, gw, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, gh * p, gw * p)


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Per-sample random masking by sorting uniform noise (MAE sec. 3, "random sampling").

    ``x``: (N, L, D) patch tokens. Keeps ``round((1 - mask_ratio) * L)`` tokens per sample (those
    with the smallest noise) and returns ``(x_visible, mask, ids_restore)``: ``x_visible``
    (N, L_keep, D) in shuffled order, ``mask`` (N, L) with 0 = kept and 1 = removed in the
    original order, ``ids_restore`` (N, L) the permutation that puts the shuffled sequence back
    in the original order (``gather(shuffled, 1, ids_restore) == original``).
    """
    n, length, dim = x.shape
    len_keep = round(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the smallest noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_visible, mask, ids_restore


def check_vit_encoder(backbone: nn.Module, method: str = "mae") -> None:
    """The encoder must be a timm ViT with a fixed absolute position embedding and square patches."""
    if not is_vit(backbone):
        raise ValueError(f"{method}: the backbone must be a timm VisionTransformer (e.g. vit_base_patch16_224), "
                         f"got {type(backbone).__name__}")
    if backbone.pos_embed is None or backbone.dynamic_img_size:
        raise ValueError(f"{method}: the ViT needs a fixed-size absolute position embedding "
                         "(pos_embed='learn', dynamic_img_size=False)")
    if backbone.attn_pool is not None:
        raise ValueError(f"{method}: attention-pool ViTs (global_pool='map') are not supported; use 'token' or 'avg'")
    ph, pw = backbone.patch_embed.patch_size
    if ph != pw:
        raise ValueError(f"{method}: square patches only, got {ph}x{pw}")


def build_decoder(embed_dim: int, decoder_embed_dim: int, depth: int, num_heads: int, mlp_ratio: float,
                  patch_pixels: int) -> tuple[nn.Linear, nn.ModuleList, nn.LayerNorm, nn.Linear]:
    """MAE's lightweight decoder (sec. 3 "MAE decoder"): ``(decoder_embed, decoder_blocks,
    decoder_norm, decoder_pred)``, an embedding of the encoder tokens into the decoder width, timm
    ``Block``s, a final LayerNorm and a linear head to the ``patch_pixels`` pixels of a patch."""
    norm_layer = partial(nn.LayerNorm, eps=1e-6)
    embed = nn.Linear(embed_dim, decoder_embed_dim)
    blocks = nn.ModuleList([
        Block(decoder_embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
        for _ in range(depth)
    ])
    return embed, blocks, norm_layer(decoder_embed_dim), nn.Linear(decoder_embed_dim, patch_pixels)


def init_mae_weights(model: nn.Module, vit: VisionTransformer, tokens: list[torch.Tensor | None]) -> None:
    """As models_mae.py: fixed sin-cos positions in the ViT, xavier_uniform for every linear of
    ``model`` and the patch projection (seen as a linear), N(0, 0.02) for the class / register
    tokens and the ``tokens`` given (mask tokens)."""
    freeze_sincos_pos_embed(vit)
    w = vit.patch_embed.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    for token in (vit.cls_token, vit.reg_token, *tokens):
        if token is not None:
            nn.init.normal_(token, std=0.02)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def split_pos_embed(vit: VisionTransformer):
    """``(prefix_pos, patch_pos)``: the ViT's position embedding of its class / register tokens
    (0 when timm leaves them without one, ``no_embed_class``) and of its patches ``(1, L, D)``."""
    pos = vit.pos_embed
    if vit.no_embed_class:
        return 0, pos
    return pos[:, :vit.num_prefix_tokens], pos[:, vit.num_prefix_tokens:]


def encode_visible(vit: VisionTransformer, x: torch.Tensor, prefix_pos) -> torch.Tensor:
    """The ViT on visible patch tokens ``x`` (N, L_keep, D) that already carry their positions:
    prepend the class / register tokens, then ``norm_pre``, ``blocks`` and the final norm."""
    prefix = [t for t in (vit.cls_token, vit.reg_token) if t is not None]
    if prefix:
        tokens = torch.cat(prefix, dim=1) + prefix_pos
        x = torch.cat([tokens.expand(x.shape[0], -1, -1), x], dim=1)
    x = vit.norm_pre(vit.pos_drop(x))
    # train.activation_checkpointing: recompute the blocks in backward, as timm's forward_features does
    x = checkpoint_seq(vit.blocks, x) if vit.grad_checkpointing and torch.is_grad_enabled() else vit.blocks(x)
    # the final LayerNorm: ``norm`` for token pooling, ``fc_norm`` (per token) when timm moved it after avg pooling
    return vit.norm(x) if not isinstance(vit.norm, nn.Identity) else vit.fc_norm(x)


def restore_with_mask_tokens(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                             num_prefix: int) -> torch.Tensor:
    """Decoder input in the original token order: the embedded encoder output ``x`` (N, P + L_keep, D)
    has its visible tokens followed by shared mask tokens, unshuffled with ``ids_restore`` (N, L);
    the ``num_prefix`` class / register tokens stay in front. Returns (N, P + L, D)."""
    n, length = ids_restore.shape
    p = num_prefix
    mask_tokens = mask_token.expand(n, p + length - x.shape[1], -1)
    x_ = torch.cat([x[:, p:], mask_tokens], dim=1)  # visible tokens then mask tokens: shuffled order
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
    return torch.cat([x[:, :p], x_], dim=1)


def run_decoder(blocks: nn.ModuleList, norm: nn.Module, pred: nn.Module, x: torch.Tensor,
                num_prefix: int) -> torch.Tensor:
    """Decoder blocks, norm and pixel head on the full token set; the prefix tokens are dropped:
    returns (N, L, p*p*C)."""
    for block in blocks:
        x = block(x)
    return pred(norm(x))[:, num_prefix:]


@register_method("mae")
class MAE(nn.Module):
    """Masked autoencoder (sec. 3): mask ``mask_ratio`` of the patches at random, encode the
    visible ones with the ViT, decode the full set (encoded tokens + a shared learned mask token,
    plus fixed 2-D sin-cos position embeddings) with a lightweight Transformer, and regress the
    pixels of the masked patches (mean squared error on masked patches only, normalised pixels
    by default). Position embeddings of encoder and decoder are fixed sin-cos (frozen), and all
    weights are initialised as in the reference code (xavier_uniform linears).
    """

    num_views = 1

    def __init__(self, backbone: nn.Module, mask_ratio: float = 0.75, decoder_embed_dim: int = 512,
                 decoder_depth: int = 8, decoder_num_heads: int = 16, mlp_ratio: float = 4.0,
                 norm_pix_loss: bool = True):
        super().__init__()
        check_vit_encoder(backbone)
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mae: mask_ratio must be in [0, 1), got {mask_ratio}")
        self.backbone: VisionTransformer = backbone
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = backbone.patch_embed.patch_size[0]
        self.in_chans = backbone.patch_embed.proj.in_channels
        self.num_prefix = backbone.num_prefix_tokens  # class (+ register) tokens, kept by the decoder
        grid = backbone.patch_embed.grid_size

        # decoder (sec. 3 "MAE decoder"): embed, mask token, sin-cos positions, blocks, pixel head
        self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred = build_decoder(
            backbone.embed_dim, decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio,
            self.patch_size ** 2 * self.in_chans)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(grid, decoder_embed_dim, self.num_prefix),
                                              requires_grad=False)
        init_mae_weights(self, backbone, [self.mask_token])

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        vit = self.backbone
        prefix_pos, patch_pos = split_pos_embed(vit)
        x = vit.patch_embed(imgs) + patch_pos  # (N, L, D); positions before masking, so visible tokens keep theirs
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)
        return encode_visible(vit, x, prefix_pos), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = restore_with_mask_tokens(self.decoder_embed(latent), ids_restore, self.mask_token, self.num_prefix)
        x = x + self.decoder_pos_embed
        return run_decoder(self.decoder_blocks, self.decoder_norm, self.decoder_pred, x, self.num_prefix)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(views) != 1:
            raise ValueError(f"MAE takes 1 view, got {len(views)}: check data.views in the recipe")
        imgs = views[0]
        latent, mask, ids_restore = self.forward_encoder(imgs, self.mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        loss = mae_loss(pred, patchify(imgs, self.patch_size), mask, self.norm_pix_loss)
        return {"loss": loss, "pred": pred, "mask": mask}
