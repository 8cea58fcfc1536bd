"""Losses as plain functions of tensors, each written like its paper's equation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_foundry.models.distributed import (all_reduce_sum, all_reduce_sum_with_grad, gather_no_grad, gather_with_grad,
                                            rank, world_size)


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


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy over the rows whose label is known (``labels >= 0``; -1 marks an unlabelled
    sample, e.g. outside ``data.labelled_fraction``); 0, still attached to the graph, when no row
    of the batch is labelled."""
    known = labels >= 0
    if not known.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[known].float(), labels[known])


def rebalanced_soft_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor,
                                  pixel_weights: torch.Tensor) -> torch.Tensor:
    """Colorization's class-rebalanced multinomial cross entropy (Zhang et al. 2016, eq. 2):

        L(Z^, Z) = - sum_{h,w} v(Z_hw) sum_q Z_hwq log Z^_hwq

    averaged (not summed) over the pixels of the batch. ``logits`` (N, Q, h, w) give Z^ by a
    softmax over the Q ab bins, ``soft_targets`` (N, Q, h, w) are Z (soft-encoded ground truth),
    ``pixel_weights`` (N, h, w) are v(Z_hw), the rebalancing weight of each pixel's nearest bin.
    """
    per_pixel = -(soft_targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    return (pixel_weights * per_pixel).mean()


def dim_scores(global_features: torch.Tensor, local_features: torch.Tensor) -> torch.Tensor:
    """Deep InfoMax's critic T(y, m) as a dot product (the "encoder-and-dot" architecture of Hjelm et
    al. 2019): ``global_features`` (N, D) and ``local_features`` (N, L, D) ->
    scores (N, N, L), ``[i, j, l] = y_i . m_{j,l}``; positives are the pairs with i == j."""
    return torch.einsum("nd,mld->nml", global_features.float(), local_features.float())


def dim_jsd_loss(global_features: torch.Tensor, local_features: torch.Tensor) -> torch.Tensor:
    """Minus DIM's Jensen-Shannon MI estimator (Hjelm et al. 2019), over every local
    position (local DIM):

        I_JSD = E_P[-sp(-T(x, E(x)))] - E_{P x P~}[sp(T(x', E(x)))],   sp(z) = log(1 + e^z)

    positives: global feature i with the local features of image i; negatives: with those of
    every other image j != i of the batch. Returns -I_JSD.
    """
    scores = dim_scores(global_features, local_features)
    same_image = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    positive = scores[same_image]  # (N, L)
    negative = scores[~same_image]  # (N(N-1), L)
    return F.softplus(-positive).mean() + F.softplus(negative).mean()


def dim_infonce_loss(global_features: torch.Tensor, local_features: torch.Tensor) -> torch.Tensor:
    """Minus DIM's InfoNCE MI estimator (Hjelm et al. 2019), over every local position:

        I_NCE = E_P[ T(x, E(x)) - log sum_{x' in {x} u X~} e^{T(x', E(x))} ]

    for global feature i and its local feature at position l, the candidates are that positive
    and the local features at every position of every other image j != i. Returns -I_NCE.
    """
    scores = dim_scores(global_features, local_features)  # (N, N, L)
    n = scores.shape[0]
    same_image = torch.eye(n, dtype=torch.bool, device=scores.device)[:, :, None]
    negatives_logsumexp = scores.masked_fill(same_image, float("-inf")).flatten(1).logsumexp(dim=1)  # (N,)
    positive = scores[same_image.squeeze(-1)]  # (N, L)
    return (torch.logaddexp(positive, negatives_logsumexp[:, None]) - positive).mean()


def joint_rotation_labels(labels: torch.Tensor, rotations: torch.Tensor, num_rotations: int = 4) -> torch.Tensor:
    """SLA's joint label (Lee et al. 2020) of class ``i`` seen at rotation ``j``:
    ``i * M + j`` among N * M, M = ``num_rotations``; -1 (unlabelled) stays -1."""
    return torch.where(labels >= 0, labels * num_rotations + rotations, -1)


def aggregated_class_logits(joint_logits: torch.Tensor, num_rotations: int = 4) -> torch.Tensor:
    """SLA's aggregation (Lee et al. 2020, "aggregated inference"): for images rotated ``j = 0..M-1`` in blocks of
    B rows (as :func:`models.pretext.rotate_all`), joint logits (M*B, N*M) -> (B, N) class logits

        s_i(x) = (1/M) sum_j z_{(i, j)}(x~_j),   P_aggregated(i | x) = softmax_i(s(x))

    i.e. the logit of (class i, rotation j) on the copy actually rotated by j, averaged over j."""
    blocks = joint_logits.reshape(num_rotations, -1, joint_logits.shape[1] // num_rotations, num_rotations)
    # blocks[j, b, i, k] = z_{(i, k)}(x~_j) of image b: keep k == j
    return torch.diagonal(blocks, dim1=0, dim2=3).mean(dim=-1)


def self_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_teacher || P_student), averaged over the batch, with the teacher a fixed target (no
    gradient): SLA's aggregated prediction distilled into a plain classifier (Lee et al. 2020, "self-distillation from aggregation")."""
    return F.kl_div(F.log_softmax(student_logits.float(), dim=1), F.log_softmax(teacher_logits.detach().float(), dim=1),
                    reduction="batchmean", log_target=True)


def tcn_triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                     margin: float = 0.2) -> torch.Tensor:
    """The triplet loss of Time-Contrastive Networks (Sermanet et al. 2018, after FaceNet's): an
    anchor frame should be closer to a frame near it in time than to a far one,

        L = mean_i [ ||f(x_i^a) - f(x_i^p)||^2 - ||f(x_i^a) - f(x_i^n)||^2 + alpha ]_+

    with f(x) on the unit hypersphere (the embeddings are L2-normalised here) and alpha the
    ``margin``. ``anchor``, ``positive``, ``negative``: (N, D), row ``i`` one triplet.
    """
    a, p, n = (F.normalize(x.float(), dim=1) for x in (anchor, positive, negative))
    d_pos = (a - p).pow(2).sum(dim=1)
    d_neg = (a - n).pow(2).sum(dim=1)
    return F.relu(d_pos - d_neg + margin).mean()


def tcn_info_nce_loss(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                      negative_mask: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """TCN's multi-pair form (the N-pairs generalisation of its triplet loss, Sohn 2016), written as
    InfoNCE with a temperature: each anchor must pick its own positive among the positives of the
    *global* batch and the far frames of its own clip,

        L_i = -log exp(a_i.p_i / t) / ( sum_j exp(a_i.p_j / t) + sum_{m in far(i)} exp(a_i.n_im / t) )

    averaged over this rank's anchors. ``anchor``, ``positive``: (B, D), row ``b`` the anchor and
    the positive of local clip ``b``; ``negatives``: (B, M, D), frames of clip ``b`` far from its
    anchor, of which ``negative_mask`` (B, M, bool) marks the valid ones. Embeddings are
    L2-normalised here; the positives of every rank are gathered with gradients, so the positive
    of local clip ``b`` on rank ``r`` is column ``r * B + b``.
    """
    a = F.normalize(anchor.float(), dim=1)
    p = F.normalize(positive.float(), dim=1)
    n = F.normalize(negatives.float(), dim=2)
    all_p = gather_with_grad(p)
    batch_logits = a @ all_p.T / temperature  # (B, N): every positive in the global batch
    clip_logits = torch.einsum("bd,bmd->bm", a, n) / temperature  # (B, M): far frames of the same clip
    clip_logits = clip_logits.masked_fill(~negative_mask.to(a.device), float("-inf"))
    labels = torch.arange(a.shape[0], device=a.device) + rank() * a.shape[0]
    return F.cross_entropy(torch.cat([batch_logits, clip_logits], dim=1), labels)


def cpc_info_nce_loss(predictions: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Contrastive Predictive Coding's InfoNCE (van den Oord et al. 2018, eq. 4), for every step k:

        f_k(x_{t+k}, c_t) = exp(z_{t+k}^T W_k c_t)                                        (eq. 3)
        L_N = - E_X [ log f_k(x_{t+k}, c_t) / sum_{x_j in X} f_k(x_j, c_t) ]              (eq. 4)

    where X holds the positive z_{t+k} and, as negatives, the z of every other position of every
    sequence in the *global* batch (this sequence's other positions included).
    ``predictions``: (B, T, K, D), ``predictions[b, t, k-1] = W_k c_t`` of local sequence ``b``;
    ``z``: (B, T, D), the encodings. Every context position t with t + k < T predicts; the loss is
    the mean over k = 1..K of eq. 4 averaged over its (b, t). ``z`` is gathered over ranks with
    gradients, so the positive of local (b, t, k) on rank ``r`` is row ``(r * B + b) * T + t + k``
    of the flattened candidates.
    """
    predictions, z = predictions.float(), z.float()
    local, length, steps = predictions.shape[:3]
    if steps >= length:
        raise ValueError(f"cpc_info_nce_loss: {steps} prediction steps need sequences longer than {steps}, "
                         f"got {length}")
    candidates = gather_with_grad(z).flatten(0, 1)  # (N * T, D)
    sequence = torch.arange(local, device=z.device).unsqueeze(1) + rank() * local
    losses = []
    for k in range(1, steps + 1):
        pred = predictions[:, :length - k, k - 1].flatten(0, 1)  # (B * (T - k), D): W_k c_t
        logits = pred @ candidates.T  # log f_k against every candidate
        labels = (sequence * length + torch.arange(k, length, device=z.device)).flatten()  # z_{t+k}
        losses.append(F.cross_entropy(logits, labels))
    return torch.stack(losses).mean()


def negative_cosine_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, z) = -p/||p|| . z/||z|| with the stop-gradient on z (Chen & He 2021, eq. 1 and
    3: ``D(p, stopgrad(z))``), averaged over the batch."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """VICReg (Bardes, Ponce, LeCun 2022, sec. 3), as the official code computes it (which is what
    the coefficients lambda = mu = 25, nu = 1 were tuned with):

        s(Z, Z')  = mean_{i, j} (z_ij - z'_ij)^2                         (invariance: MSE)
        v(Z)      = 1/d sum_j max(0, 1 - sqrt(Var(z^j) + eps))          (variance: hinge on the std)
        C(Z)      = 1/(n - 1) sum_i (z_i - zbar)(z_i - zbar)^T
        c(Z)      = 1/d sum_{i != j} C(Z)_ij^2                            (covariance)
        L = lambda s(Z, Z') + mu [v(Z) + v(Z')] / 2 + nu [c(Z) + c(Z')]

    (the paper's total loss has mu [v(Z) + v(Z')] and a sum over features in s; the code halves
    the variance term and averages s over features). Var is unbiased; n is the *global* batch: the
    variance and covariance terms see every rank's embeddings (gathered with gradients, as the
    reference code's FullGatherLayer), the invariance term is local and averaged over ranks by DDP.
    """
    z1, z2 = z1.float(), z2.float()
    invariance = F.mse_loss(z1, z2)
    variance = covariance = 0.0
    for z in (gather_with_grad(z1), gather_with_grad(z2)):
        n, d = z.shape
        z = z - z.mean(dim=0)
        variance = variance + F.relu(1 - torch.sqrt(z.var(dim=0) + eps)).mean() / 2
        cov = z.T @ z / (n - 1)
        covariance = covariance + (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / d
    return sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance


def nnclr_loss(nearest: torch.Tensor, p: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NNCLR (Dwibedi et al. 2021, eq. 2, with the prediction head the paper trains with): the nearest
    neighbour NN(z_i, Q) of each embedding in the support set Q is the anchor, the prediction of
    the other view of the same image the positive, those of every other image of the *global*
    batch the negatives:

        L_i = -log exp(NN(z_i, Q) . p_i^+ / t) / sum_{k=1..n} exp(NN(z_i, Q) . p_k^+ / t)

    averaged over this rank's anchors; all vectors L2-normalised. ``nearest`` comes from the
    support set and carries no gradient; ``p`` is gathered from every rank with gradients, and
    the positive of local sample ``b`` on rank ``r`` is global row ``r * B + b``.
    """
    nearest = F.normalize(nearest.float(), dim=1).detach()
    all_p = gather_with_grad(F.normalize(p.float(), dim=1))
    logits = nearest @ all_p.T / temperature
    labels = torch.arange(nearest.shape[0], device=nearest.device) + rank() * nearest.shape[0]
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3,
                   shared_scores: torch.Tensor | None = None) -> torch.Tensor:
    """Soft assignments of the samples of the *global* batch to K prototypes (SwAV, Caron et al.
    2020, sec. 3.1, eq. 3 and its solution eq. 5; DINOv2's optional centering of the teacher, Oquab
    et al. 2023, sec. 4): the Q (K x B) that maximises

        Tr(Q^T C^T Z) + eps H(Q)   subject to   Q 1_B = 1_K / K,   Q^T 1_K = 1_B / B

    (every prototype gets an equal share of the batch). Its solution Q* = Diag(u) exp(C^T Z / eps)
    Diag(v) is approximated, as in the official code, by normalising exp(C^T Z / eps) to sum 1, then
    ``iterations`` times its rows (to 1/K each, sums over every rank) and its columns (to 1/B);
    returned times B, so each sample's code sums to 1.

    ``scores`` (N, K): this rank's samples against the prototypes, C^T Z (ranks may hold different
    N). ``shared_scores`` (S, K): SwAV's queue of past embeddings, identical on every rank: its S
    columns take part in the normalisation once (not once per rank), so B = sum of N over ranks + S,
    exactly as the official per-rank queues of S / world_size embeddings each. Returns (N, K), this
    rank's codes.
    """
    q = torch.exp(scores.float() / epsilon).T
    shared = (torch.exp(shared_scores.float() / epsilon).T if shared_scores is not None
              else q.new_zeros(q.shape[0], 0))
    prototypes = q.shape[0]
    samples = all_reduce_sum(q.new_tensor(float(q.shape[1]))) + shared.shape[1]
    total = all_reduce_sum(q.sum()) + shared.sum()
    q, shared = q / total, shared / total
    for _ in range(iterations):
        rows = all_reduce_sum(q.sum(dim=1, keepdim=True)) + shared.sum(dim=1, keepdim=True)
        q, shared = q / rows / prototypes, shared / rows / prototypes
        q = q / q.sum(dim=0, keepdim=True) / samples
        shared = shared / shared.sum(dim=0, keepdim=True) / samples
    return (q * samples).T


def swapped_prediction_loss(scores: list[torch.Tensor], codes: list[torch.Tensor], assign_views: list[int],
                            temperature: float = 0.1) -> torch.Tensor:
    """SwAV's swapped prediction over multi-crop (Caron et al. 2020, eq. 2 and sec. 3.2): the code
    q_s of each view s in ``assign_views`` (the global views) is predicted from every other view t,

        l(z_t, q_s) = - mean_b sum_k q_s[b, k] log softmax_k(z_t[b] . c_k / tau)
        L = 1/|S| sum_{s in S} 1/(V - 1) sum_{t != s} l(z_t, q_s)

    ``scores[t]`` (B, K): view t's z . c against the prototypes; ``codes[i]`` (B, K): the codes
    of view ``assign_views[i]``, no gradient.
    """
    loss = scores[0].new_zeros((), dtype=torch.float32)
    for view, q in zip(assign_views, codes):
        others = [t for t in range(len(scores)) if t != view]
        log_p = [F.log_softmax(scores[t].float() / temperature, dim=1) for t in others]
        loss = loss + torch.stack([-(q * log_p_t).sum(dim=1).mean() for log_p_t in log_p]).mean()
    return loss / len(codes)


def cosine_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cos(s, t) between the (projected) student feature and the frozen teacher's, averaged over
    the batch: regression of the teacher's feature direction, as SimReg (Navaneet et al. 2021)."""
    return (1 - F.cosine_similarity(student.float(), teacher.detach().float(), dim=1)).mean()


def smooth_l1_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Feature distillation (Wei et al. 2022, "Contrastive Learning Rivals Masked Image Modeling in
    Fine-tuning via Feature Distillation", sec. 3.1): smooth L1 (``beta`` 2.0, the official code's)
    between the projected student feature and the teacher's feature whitened by a non-parametric
    layer norm (zero mean, unit variance over its channels, eps 1e-5), averaged over batch and channels."""
    target = F.layer_norm(teacher.detach().float(), teacher.shape[-1:])
    return F.smooth_l1_loss(student.float(), target, beta=beta)


def dino_loss(student_logits: list[torch.Tensor], teacher_probs: list[torch.Tensor],
              student_temp: float = 0.1) -> torch.Tensor:
    """DINO's self-distillation loss over multi-crop views (Caron et al. 2021, sec. 3.1, eq. 3):

        P_s(x) = softmax(g_s(x) / t_s)
        L = mean over pairs (x in {x_1^g, x_2^g}, x' in V, x' != x) of  H(P_t(x), P_s(x')),
        H(a, b) = -sum_k a_k log b_k

    each pair's cross entropy averaged over the batch, then averaged over the pairs (DINO's
    ``total_loss / n_loss_terms``). ``student_logits``: one (B, K) batch per view, the global views
    first; ``teacher_probs``: P_t of the global views, (B, K) each, already centred and sharpened
    (:class:`models.methods.dino.TeacherCenter` or :func:`sinkhorn_knopp`), no gradient. The pair
    of a global view with itself is skipped.
    """
    log_probs = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_logits]
    pairs = [(t, lp) for i, t in enumerate(teacher_probs) for v, lp in enumerate(log_probs) if v != i]
    if not pairs:
        raise ValueError("dino_loss: no (teacher view, other student view) pair: give at least 2 views")
    return torch.stack([-(t.detach() * lp).sum(dim=-1).mean() for t, lp in pairs]).mean()


def ibot_patch_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor,
                    student_temp: float = 0.1) -> torch.Tensor:
    """iBOT's masked image modelling loss (Zhou et al. 2022, sec. 3.2, eq. 2), a patch-level DINO
    loss: the student's output at each *masked* patch of a view predicts the teacher's output at
    that patch of the unmasked view,

        L_MIM = - sum_i m_i P_t(u_i)^T log P_s(u^_i),   P_s = softmax(g_s / t_s)

    averaged over the masked patches of each view, then over every view of the batch (a view
    without a masked patch counts 0), as iBOT's and DINOv2's code normalise it. ``masks``: (N, L)
    bool, True = masked; ``student_logits`` and ``teacher_probs``: (M, K), one row per masked patch
    in ``masks.nonzero()`` order (view by view, row-major), M = ``masks.sum()``.
    """
    per_patch = -(teacher_probs.detach() * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(dim=-1)
    masked_per_view = masks.sum(dim=1, keepdim=True).clamp(min=1)
    weights = (1.0 / masked_per_view).expand_as(masks)[masks]  # 1 / (masked patches of its view)
    return (per_patch * weights).sum() / masks.shape[0]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The Kozachenko-Leonenko differential entropy estimator as a regulariser (Sablayrolles et al.
    2019, "Spreading vectors for similarity search", sec. 4), DINOv2's KoLeo (Oquab et al. 2023,
    sec. 4): on L2-normalised x, with d_i the distance of x_i to its nearest other sample,

        L_koleo = -(1/n) sum_i log(d_i),   d_i = min_{j != i} ||x_i - x_j||

    which pushes the batch's features apart uniformly. ``x``: (n, D), n >= 2; computed in fp32. As in
    DINOv2 the neighbours are searched within this rank's batch only.
    """
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.T
        dots.fill_diagonal_(-1.0)  # never its own neighbour (cosines are >= -1)
        nearest = dots.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], eps=eps)
    return -torch.log(distances + eps).mean()
