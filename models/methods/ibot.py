"""iBOT: Zhou, Wei, Wang, Shen, Xie, Yuille, Kong, "iBOT: Image BERT Pre-Training with Online
Tokenizer", ICLR 2022. https://arxiv.org/abs/2111.07832
and its extension in DINOv2: Oquab, Darcet, Moutakanni et al., "DINOv2: Learning Robust Visual
Features without Supervision", TMLR 2024. https://arxiv.org/abs/2304.07193

DINO's image-level self-distillation on the class token plus a patch-level one: the student sees
its global views with blocks of patches masked and predicts, at every masked patch, the teacher's
output for that patch of the unmasked view (masked image modelling with an online tokenizer).
DINOv2 adds the KoLeo regulariser on the student's class tokens and, optionally, Sinkhorn-Knopp
centering of the teacher. Laid out like DINOv2's ``ssl_meta_arch.py``; the backbone is a timm
``VisionTransformer`` (register tokens through ``model.backbone_args.reg_tokens``), the masked
forward runs its own modules (``models.backbones.vit_tokens``), so the exported backbone is plain timm.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn as nn

from ssl_foundry.models.backbones import is_vit, vit_tokens
from ssl_foundry.models.heads import DINOHead
from ssl_foundry.models.losses import dino_loss, ibot_patch_loss, koleo_loss, sinkhorn_knopp
from ssl_foundry.models.methods.dino import SelfDistillation, TeacherCenter
from ssl_foundry.models.multicrop import forward_by_resolution, split_views
from ssl_foundry.models.registry import register_method

CENTERINGS = ("centering", "sinkhorn_knopp")


class BlockMasking:
    """Blockwise masking of a (height, width) patch grid (BEiT, Bao et al. 2022, Algorithm 1; the
    ``MaskingGenerator`` of iBOT and DINOv2): rectangles of area drawn uniformly from
    [``min_patches``, remaining budget] (at most ``max_patches`` at once) and aspect ratio
    log-uniform in [``min_aspect``, 1 / ``min_aspect``] are added at random places until
    ``num_masked`` patches are masked, or until 10 tries in a row add nothing."""

    def __init__(self, grid: tuple[int, int], max_patches: float | None = None, min_patches: int = 4,
                 min_aspect: float = 0.3):
        self.height, self.width = grid
        self.max_patches = 0.5 * self.height * self.width if max_patches is None else max_patches
        self.min_patches = min_patches
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _add_block(self, mask: torch.Tensor, budget: float, rng: random.Random) -> int:
        """One rectangle (up to 10 tries); returns how many patches it newly masked."""
        for _ in range(10):
            area = rng.uniform(self.min_patches, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if w < self.width and h < self.height:
                top, left = rng.randint(0, self.height - h), rng.randint(0, self.width - w)
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= budget:
                    block.fill_(True)
                    return new
        return 0

    def __call__(self, num_masked: int, rng: random.Random) -> torch.Tensor:
        """A (height, width) bool mask with about ``num_masked`` patches True."""
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < num_masked:
            added = self._add_block(mask, min(num_masked - count, self.max_patches), rng)
            if added == 0:
                break
            count += added
        return mask


def sample_masks(num_views: int, masking: BlockMasking, probability: float, ratio: tuple[float, float],
                 rng: random.Random) -> torch.Tensor:
    """DINOv2's masks for a batch of ``num_views`` global views (``collate_data_and_cast``):
    ``int(num_views * probability)`` views are masked, their masking ratios spread evenly over
    ``ratio`` (view i draws its ratio in the i-th of as many equal sub-ranges), the others not at
    all; the masks are shuffled over the views. Returns (num_views, L) bool, L = grid patches."""
    num_patches = masking.height * masking.width
    masked_views = int(num_views * probability)
    bounds = torch.linspace(ratio[0], ratio[1], masked_views + 1).tolist()
    masks = [masking(int(num_patches * rng.uniform(bounds[i], bounds[i + 1])), rng) for i in range(masked_views)]
    masks += [masking(0, rng) for _ in range(num_views - masked_views)]
    rng.shuffle(masks)
    return torch.stack(masks).flatten(1)


@register_method("ibot")
class IBOT(SelfDistillation):
    """Student (ViT, DINO head, a learned mask token) and teacher (EMA, no stochastic depth; the
    schedules are :class:`models.methods.dino.SelfDistillation`'s):

        u = global views, m = blockwise masks (a share ``mask_probability`` of the global views,
            ratios in ``mask_ratio``), v = local views
        teacher:  t_cls, t_patch = g_t(u)                            (unmasked; no gradient)
        student:  s_cls, s_patch = g_s(mask(u, m)),  s_local = g_s(v)[cls]
        L = L_[CLS] + ``patch_loss_weight`` L_MIM + ``koleo_weight`` L_koleo
          L_[CLS] = DINO loss of s_cls, s_local against t_cls        (pairs of different views)
          L_MIM   = iBOT's patch loss of s_patch against t_patch at the masked patches
          L_koleo = sum over the global views of KoLeo(student class tokens)   (DINOv2)

    The teacher's outputs are centred and sharpened (``centering``: an EMA centre per output, as
    DINO, or Sinkhorn-Knopp over the global batch, DINOv2's option), both at the warmed-up teacher
    temperature. With ``separate_head`` the patch tokens have their own head (``patch_out_dim``),
    else the class-token head is shared (iBOT's ``shared_head``, DINOv2's default). The heads run
    on the class tokens and on the masked patch tokens only (DINOv2's economy; iBOT's code runs
    the student head on every patch and keeps the masked ones, the same loss).

    Defaults are iBOT's ViT-S/16 recipe (README: 8192 prototypes, shared head, no last-layer
    normalisation, teacher temperature 0.04 -> 0.07); DINOv2's recipe sets ``koleo_weight=0.1``,
    65536 prototypes, ``momentum=0.992``. The backbone must be a timm ViT with a class token and
    token pooling (the [CLS] token is DINO's output); its exported weights are the teacher's.
    """

    def __init__(self, backbone: nn.Module, out_dim: int = 8192, patch_out_dim: int = 8192, separate_head: bool = False,
                 hidden_dim: int = 2048, bottleneck_dim: int = 256, head_layers: int = 3, norm_last_layer: bool = False,
                 momentum: float = 0.996, student_temp: float = 0.1, teacher_temp: float = 0.07,
                 warmup_teacher_temp: float = 0.04, warmup_teacher_temp_steps: int = 0, center_momentum: float = 0.9,
                 centering: str = "centering", sinkhorn_iterations: int = 3, freeze_last_layer_steps: int = 0,
                 mask_probability: float = 0.5, mask_ratio: tuple[float, float] = (0.1, 0.5),
                 mask_min_patches: int = 4, patch_loss_weight: float = 1.0, koleo_weight: float = 0.0):
        super().__init__(momentum, teacher_temp, warmup_teacher_temp, warmup_teacher_temp_steps, freeze_last_layer_steps)
        if not is_vit(backbone) or backbone.cls_token is None or backbone.global_pool != "token":
            raise ValueError("ibot: the backbone must be a timm VisionTransformer with a class token and token "
                             f"pooling (global_pool='token'), got {type(backbone).__name__}")
        if centering not in CENTERINGS:
            raise ValueError(f"ibot: centering must be one of {', '.join(CENTERINGS)}, got '{centering}'")
        if not (0 < mask_probability <= 1 and 0 <= mask_ratio[0] <= mask_ratio[1] < 1):
            raise ValueError(f"ibot: mask_probability must be in (0, 1] and mask_ratio [min, max] within [0, 1), "
                             f"got {mask_probability}, {mask_ratio}")
        if not separate_head and patch_out_dim != out_dim:
            raise ValueError(f"ibot: a shared head has one output size; patch_out_dim={patch_out_dim} needs "
                             f"separate_head=true (or set it equal to out_dim={out_dim})")
        self.backbone = backbone
        head_args = (hidden_dim, bottleneck_dim, head_layers, False, norm_last_layer)
        self.head = DINOHead(backbone.num_features, out_dim, *head_args)
        # iBOT's shared_head (DINOv2's default): the class-token head also maps the patch tokens
        self.patch_head = DINOHead(backbone.num_features, patch_out_dim, *head_args) if separate_head else None
        self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim))
        self.make_teacher()
        self.center = TeacherCenter(out_dim, center_momentum)
        self.patch_center = TeacherCenter(patch_out_dim, center_momentum)
        self.student_temp, self.centering, self.sinkhorn_iterations = student_temp, centering, sinkhorn_iterations
        self.mask_probability, self.mask_ratio, self.mask_min_patches = mask_probability, tuple(mask_ratio), mask_min_patches
        self.patch_loss_weight, self.koleo_weight = patch_loss_weight, koleo_weight

    def student(self) -> nn.ModuleDict:
        heads = {"head": self.head, **({"patch_head": self.patch_head} if self.patch_head is not None else {})}
        return nn.ModuleDict({"backbone": self.backbone, **heads})

    @staticmethod
    def _patch_head(network: nn.Module) -> DINOHead:
        """The head of the patch tokens of ``network`` (the student, or the teacher's copy)."""
        return getattr(network, "patch_head", None) or network.head

    def sample_masks(self, global_views: torch.Tensor) -> torch.Tensor:
        """(N, L) bool masks for the N global views' patch grids, drawn from torch's RNG (so the
        trainer's seeding and checkpointed RNG state make them reproducible)."""
        grid = self.backbone.patch_embed.dynamic_feat_size(tuple(global_views.shape[-2:]))
        rng = random.Random(int(torch.randint(2**62, ())))
        masking = BlockMasking(grid, min_patches=self.mask_min_patches)
        return sample_masks(global_views.shape[0], masking, self.mask_probability, self.mask_ratio, rng)

    def teacher_targets(self, logits: torch.Tensor, center: TeacherCenter, temperature: float) -> torch.Tensor:
        """P_t of the teacher's logits: centred (and the centre updated) or Sinkhorn-Knopp."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temperature, self.sinkhorn_iterations)
        probs = center.probs(logits, temperature)
        center.update(logits)
        return probs

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        global_views, local_views = split_views(views, self.num_views, "ibot")
        temperature = self.start_step()
        images = torch.cat(global_views)
        masks = self.sample_masks(images).to(images.device)
        prefix = self.backbone.num_prefix_tokens

        teacher = self.teacher.module
        with torch.no_grad():
            tokens = teacher.backbone.forward_features(images)
            teacher_cls = teacher.head(tokens[:, 0])
            teacher_patch = self._patch_head(teacher)(tokens[:, prefix:][masks])
            cls_probs = self.teacher_targets(teacher_cls, self.center, temperature).chunk(self.num_views)
            patch_probs = self.teacher_targets(teacher_patch, self.patch_center, temperature)

        tokens = vit_tokens(self.backbone, images, masks, self.mask_token)
        student_cls = tokens[:, 0]
        local_cls = [forward_by_resolution(self.backbone, local_views)] if local_views else []
        cls_logits = self.head(torch.cat([student_cls, *local_cls])).chunk(len(views))
        patch_logits = self._patch_head(self)(tokens[:, prefix:][masks])

        cls_loss = dino_loss(list(cls_logits), list(cls_probs), self.student_temp)
        patch_loss = ibot_patch_loss(patch_logits, patch_probs, masks, self.student_temp)
        loss = cls_loss + self.patch_loss_weight * patch_loss
        out = {"cls_loss": cls_loss.detach(), "patch_loss": patch_loss.detach()}
        if self.koleo_weight:
            # per global view: KoLeo pushes apart different images, never two views of one image
            koleo = sum(koleo_loss(c) for c in student_cls.chunk(self.num_views))
            loss = loss + self.koleo_weight * koleo
            out["koleo_loss"] = koleo.detach()
        return {"loss": loss, **out}
