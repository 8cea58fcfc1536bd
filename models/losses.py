"""Losses as plain functions of tensors, each written like its paper's equation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.distributed import all_reduce_sum_with_grad, gather_no_grad, gather_with_grad, rank, world_size


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent, the normalised temperature-scaled cross entropy of SimCLR (Chen et al. 2020, eq. 1):

        l(i, j) = -log exp(sim(z_i, z_j)/t) / sum_{k != i} exp(sim(z_i, z_k)/t)

    averaged over all 2N anchors, where sim is cosine similarity and the 2N-2 negatives of an
    anchor are every other view in the *global* batch. ``z1[b]`` and ``z2[b]`` are the two views
    of local sample ``b``; under DDP they are gathered with gradients from every rank and the
    positive of local sample ``b`` on rank ``r`` sits at global index ``r * B + b``.
    """
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    all_z1, all_z2 = gather_with_grad(z1), gather_with_grad(z2)
    local, total = z1.shape[0], all_z1.shape[0]
    anchors = torch.cat([z1, z2])  # (2B, D): this rank's anchors
    candidates = torch.cat([all_z1, all_z2])  # (2N, D): every view in the global batch
    logits = anchors @ candidates.T / temperature

    own = torch.arange(local, device=z1.device) + rank() * local
    self_index = torch.cat([own, own + total])  # an anchor is not its own negative
    positive_index = torch.cat([own + total, own])  # view 1 <-> view 2 of the same image
    self_mask = F.one_hot(self_index, 2 * total).bool()
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, positive_index)


def info_nce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """InfoNCE with a queue of negatives, MoCo (He et al. 2020, eq. 1; MoCo v2: Chen et al. 2020):

        L_q = -log exp(q.k+ / t) / (exp(q.k+ / t) + sum_{i=1..K} exp(q.k_i / t))

    averaged over this rank's queries. ``q`` (N, D) are queries, ``k`` (N, D) their positive keys
    (row ``b`` of ``k`` is the positive of row ``b`` of ``q``), ``queue`` (K, D) the negative keys.
    ``q`` and ``k`` are L2-normalised here; the queue holds keys that were normalised when they
    were enqueued. Keys and queue come from the momentum encoder and carry no gradient.
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1).detach()
    l_pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
    l_neg = q @ queue.detach().float().T  # (N, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # the positive is column 0
    return F.cross_entropy(logits, labels)


def moco_v3_contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """MoCo v3's ctr(q, k) (Chen, Xie, He 2021, Algorithm 1): InfoNCE of each query against the
    momentum keys of the whole *global* batch, the key of the same image being the positive,

        ctr(q, k) = 2t * CE(q . gather(k)^T / t, labels),   labels = rank * N + arange(N)

    ``q`` (N, D) and ``k`` (N, D) are this rank's queries and keys, L2-normalised here. Keys come
    from the momentum encoder: they are gathered without gradient. The 2t factor is the paper's.
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1).detach()
    all_k = gather_no_grad(k)
    logits = q @ all_k.T / temperature  # (N, N * world_size)
    labels = torch.arange(q.shape[0], device=q.device) + rank() * q.shape[0]
    return 2 * temperature * F.cross_entropy(logits, labels)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised mean squared error (Grill et al. 2020, eq. 2):

        L = || p/||p|| - z/||z|| ||^2 = 2 - 2 <p, z> / (||p|| ||z||)

    averaged over the batch; ``p`` is the online prediction, ``z`` the target projection (the
    stop-gradient of the paper: ``z`` is detached).
    """
    p = F.normalize(p.float(), dim=1)
    z = F.normalize(z.float(), dim=1).detach()
    return (2 - 2 * (p * z).sum(dim=1)).mean()


def _standardize_over_global_batch(z: torch.Tensor, eps: float) -> torch.Tensor:
    """(z - mean) / sqrt(var + eps) per feature, mean and biased variance over the global batch
    (what BatchNorm1d(affine=False) in train mode computes on one process), differentiable."""
    n = z.shape[0] * world_size()
    mean = all_reduce_sum_with_grad(z.sum(dim=0)) / n
    var = all_reduce_sum_with_grad(((z - mean) ** 2).sum(dim=0)) / n
    return (z - mean) / torch.sqrt(var + eps)


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051, eps: float = 1e-5) -> torch.Tensor:
    """Barlow Twins (Zbontar et al. 2021, eq. 1 and 2):

        C_ij = sum_b zA_bi zB_bj / (sqrt(sum_b zA_bi^2) sqrt(sum_b zB_bj^2))     (z centred over b)
        L    = sum_i (1 - C_ii)^2 + lambda * sum_i sum_{j != i} C_ij^2

    with b running over the *global* batch. As in the reference code, each embedding is
    batch-normalised (no affine, eps) and C = zA_norm^T zB_norm / N. Under DDP every rank
    adds its local share of C (and of the BN statistics) with :func:`all_reduce_sum_with_grad`,
    so each rank holds the full C and the gradient is exactly one process's on the
    concatenated batch (no 1/world_size factor).
    """
    z1 = _standardize_over_global_batch(z1.float(), eps)
    z2 = _standardize_over_global_batch(z2.float(), eps)
    n = z1.shape[0] * world_size()
    c = all_reduce_sum_with_grad(z1.T @ z2) / n  # (D, D), the global cross-correlation
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
             norm_pix_loss: bool = True) -> torch.Tensor:
    """MAE's reconstruction loss (He et al. 2021, sec. 3): mean squared error between predicted and
    original pixels, per patch, averaged over the *masked* patches only.

    ``pred``, ``target``: (N, L, p*p*C) patch pixels; ``mask``: (N, L), 1 = masked (removed from
    the encoder), 0 = visible. ``norm_pix_loss``: the target is each patch's pixels normalised by
    the patch's mean and standard deviation (the paper's "normalized pixels" variant). With no
    masked patch at all the loss is 0.
    """
    target = target.float()
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # (N, L)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)
