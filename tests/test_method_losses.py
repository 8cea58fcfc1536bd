"""The losses of MoCo v2, MoCo v3, BYOL, Barlow Twins, MAE, SwAV (Sinkhorn-Knopp and the swapped
prediction), VICReg, SimSiam, NNCLR and feature distillation against their papers' formulas (or the
official code), written out as plain loops, plus hand-worked cases (single process)."""
import math

import pytest
import torch
import torch.nn.functional as F

from ssl_foundry.models.losses import (barlow_twins_loss, byol_loss, cosine_distillation_loss, info_nce_loss, mae_loss,
                                       moco_v3_contrastive_loss, negative_cosine_loss, nnclr_loss, sinkhorn_knopp,
                                       smooth_l1_distillation_loss, swapped_prediction_loss, vicreg_loss)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def unit(v):
    return v / math.sqrt(sum(float(x) ** 2 for x in v))


def dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- MoCo v2


def reference_info_nce(q, k, queue, t):
    """MoCo eq. 1 for every query, averaged."""
    total = 0.0
    for i in range(q.shape[0]):
        qi, ki = unit(q[i]), unit(k[i])
        positive = math.exp(dot(qi, ki) / t)
        negatives = sum(math.exp(dot(qi, queue[j]) / t) for j in range(queue.shape[0]))
        total += -math.log(positive / (positive + negatives))
    return total / q.shape[0]


@pytest.mark.parametrize("n,d,size,t", [(3, 4, 5, 0.2), (6, 8, 12, 0.07), (4, 2, 1, 1.0)])
def test_info_nce_matches_loop_reference(n, d, size, t):
    q, k = randn(n, d, seed=1), randn(n, d, seed=2)
    queue = F.normalize(randn(size, d, seed=3), dim=1)
    got = info_nce_loss(q.float(), k.float(), queue.float(), t).item()
    assert got == pytest.approx(reference_info_nce(q, k, queue, t), rel=1e-5)


def test_info_nce_hand_worked_case():
    # q = k = e_0, queue = {e_1, e_2}: positive logit 1/t, two negatives at 0 -> log(1 + 2 e^{-1/t})
    q = torch.tensor([[1.0, 0.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    for t in (0.2, 1.0):
        expected = math.log(1 + 2 * math.exp(-1 / t))
        assert info_nce_loss(q, q.clone(), queue, t).item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_gradient_reaches_queries_only():
    q, k = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    queue = torch.randn(6, 3, requires_grad=True)
    info_nce_loss(q, k, queue, 0.2).backward()
    assert q.grad.abs().sum() > 0 and k.grad is None and queue.grad is None


# ----------------------------------------------------------------------------- MoCo v3


def reference_moco_v3_ctr(q, k, t):
    """ctr(q, k) of MoCo v3 Algorithm 1: 2t * mean_i -log softmax_j(q_i.k_j / t)[i]."""
    total = 0.0
    for i in range(q.shape[0]):
        qi = unit(q[i])
        logits = [dot(qi, unit(k[j])) / t for j in range(k.shape[0])]
        total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    return 2 * t * total / q.shape[0]


@pytest.mark.parametrize("n,d,t", [(3, 4, 1.0), (8, 16, 0.2), (5, 3, 0.5)])
def test_moco_v3_loss_matches_loop_reference(n, d, t):
    q, k = randn(n, d, seed=n), randn(n, d, seed=n + 1)
    got = moco_v3_contrastive_loss(q.float(), k.float(), t).item()
    assert got == pytest.approx(reference_moco_v3_ctr(q, k, t), rel=1e-5)


def test_moco_v3_hand_worked_case_and_no_key_gradient():
    # q = k = I_n: every query has similarity 1 with its key, 0 with the n-1 others
    for n, t in ((2, 1.0), (4, 0.2)):
        q = torch.eye(n, requires_grad=True)
        k = torch.eye(n, requires_grad=True)
        loss = moco_v3_contrastive_loss(q, k, t)
        assert loss.item() == pytest.approx(2 * t * math.log(1 + (n - 1) * math.exp(-1 / t)), rel=1e-5)
        loss.backward()
        assert k.grad is None and q.grad is not None


# ----------------------------------------------------------------------------- BYOL


@pytest.mark.parametrize("n,d", [(1, 3), (5, 8), (7, 2)])
def test_byol_loss_matches_formula(n, d):
    p, z = randn(n, d, seed=d), randn(n, d, seed=d + 7)
    reference = sum(sum((a - b) ** 2 for a, b in zip(unit(p[i]), unit(z[i]))) for i in range(n)) / n
    assert byol_loss(p.float(), z.float()).item() == pytest.approx(reference, rel=1e-5)
    # == 2 - 2 cos, and invariant to the scale of each vector
    assert byol_loss(p.float() * 3.0, z.float() * 0.1).item() == pytest.approx(
        (2 - 2 * F.cosine_similarity(p, z)).mean().item(), rel=1e-5)


def test_byol_loss_hand_cases_and_stop_gradient():
    e0, e1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert byol_loss(e0, 2 * e0).item() == pytest.approx(0.0, abs=1e-7)
    assert byol_loss(e0, e1).item() == pytest.approx(2.0)
    assert byol_loss(e0, -e0).item() == pytest.approx(4.0)
    p, z = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    byol_loss(p, z).backward()
    assert z.grad is None and p.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- Barlow Twins


def reference_barlow_twins(z1, z2, lambd):
    """Zbontar et al. eq. 1-2 with C_ij the Pearson correlation over the batch, by loops."""
    n, d = z1.shape
    a = [[float(z1[b, i]) - float(z1[:, i].mean()) for i in range(d)] for b in range(n)]
    c = [[float(z2[b, j]) - float(z2[:, j].mean()) for j in range(d)] for b in range(n)]
    norm_a = [math.sqrt(sum(a[b][i] ** 2 for b in range(n))) for i in range(d)]
    norm_c = [math.sqrt(sum(c[b][j] ** 2 for b in range(n))) for j in range(d)]
    loss = 0.0
    for i in range(d):
        for j in range(d):
            cij = sum(a[b][i] * c[b][j] for b in range(n)) / (norm_a[i] * norm_c[j])
            loss += (1 - cij) ** 2 if i == j else lambd * cij ** 2
    return loss


@pytest.mark.parametrize("n,d,lambd", [(4, 3, 0.0051), (9, 6, 0.1), (16, 5, 1.0)])
def test_barlow_twins_matches_loop_reference(n, d, lambd):
    z1, z2 = randn(n, d, seed=n), randn(n, d, seed=n * d)
    got = barlow_twins_loss(z1.float(), z2.float(), lambd, eps=0.0).item()
    assert got == pytest.approx(reference_barlow_twins(z1, z2, lambd), rel=1e-4)


@pytest.mark.parametrize("n,d,lambd", [(8, 4, 0.0051), (32, 16, 0.02)])
def test_barlow_twins_matches_reference_code_with_batchnorm(n, d, lambd):
    """The official implementation: BatchNorm1d(affine=False), C = bn(z1)^T bn(z2) / N."""
    z1, z2 = randn(n, d, seed=1).float(), randn(n, d, seed=2).float()
    bn = torch.nn.BatchNorm1d(d, affine=False).train()
    c = bn(z1).T @ bn(z2) / n
    off = c.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()  # the reference code's off_diagonal
    expected = (torch.diagonal(c) - 1).pow(2).sum() + lambd * off.pow(2).sum()
    assert barlow_twins_loss(z1, z2, lambd).item() == pytest.approx(expected.item(), rel=1e-5)


def test_barlow_twins_hand_case_identity_correlation_is_zero():
    # Identical views with centred, mutually orthogonal feature columns: C = I, so L = 0.
    h = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0], [1.0, -1.0, -1.0, 1.0]])
    z = h[:, 1:]  # columns 1..3 of a Hadamard matrix: zero mean, orthogonal
    assert barlow_twins_loss(z, z.clone(), 0.5, eps=0.0).item() == pytest.approx(0.0, abs=1e-6)
    # anti-correlated twin on the diagonal: C = -I -> sum (1 - (-1))^2 = 4 d
    assert barlow_twins_loss(z, -z, 0.5, eps=0.0).item() == pytest.approx(4.0 * 3, rel=1e-5)


# ----------------------------------------------------------------------------- MAE


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_is_mean_over_masked_patches_only(norm_pix):
    n, length, dim = 2, 6, 4
    target, pred = randn(n, length, dim, seed=3).float(), randn(n, length, dim, seed=4).float()
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 1, 0]], dtype=torch.float32)
    tgt = target
    if norm_pix:
        tgt = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    expected = [float(((pred[b, i] - tgt[b, i]) ** 2).mean()) for b in range(n) for i in range(length) if mask[b, i]]
    pred.requires_grad_(True)
    loss = mae_loss(pred, target, mask, norm_pix_loss=norm_pix)
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    loss.backward()
    visible = mask == 0
    assert pred.grad[visible].abs().sum() == 0 and pred.grad[~visible].abs().sum() > 0
    # anything predicted on visible patches is ignored
    garbage = torch.where(visible.unsqueeze(-1), torch.full_like(pred, 1e3), pred.detach())
    assert mae_loss(garbage, target, mask, norm_pix).item() == pytest.approx(loss.item(), rel=1e-6)


def test_mae_loss_without_masked_patches_is_zero():
    x = torch.randn(2, 4, 3)
    assert mae_loss(x + 1, x, torch.zeros(2, 4), norm_pix_loss=False).item() == 0.0


# ----------------------------------------------------------------------------- SwAV


def reference_sinkhorn(scores, epsilon, iterations):
    """SwAV's distributed_sinkhorn on one process, by loops over a list of lists (K x B)."""
    b, k = len(scores), len(scores[0])
    q = [[math.exp(scores[i][j] / epsilon) for i in range(b)] for j in range(k)]
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        q = [[v / sum(row) / k for v in row] for row in q]
        columns = [sum(q[j][i] for j in range(k)) for i in range(b)]
        q = [[q[j][i] / columns[i] / b for i in range(b)] for j in range(k)]
    return [[q[j][i] * b for j in range(k)] for i in range(b)]


@pytest.mark.parametrize("b,k,epsilon,iterations", [(4, 3, 0.05, 3), (6, 10, 0.5, 1), (5, 2, 0.1, 7)])
def test_sinkhorn_matches_loop_reference(b, k, epsilon, iterations):
    scores = torch.tanh(randn(b, k, seed=b * k))  # cosine similarities lie in [-1, 1]
    got = sinkhorn_knopp(scores.float(), epsilon, iterations)
    expected = torch.tensor(reference_sinkhorn(scores.tolist(), epsilon, iterations))
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(b))  # each sample's code sums to 1


def test_sinkhorn_hand_worked_cases():
    # equal scores: every prototype equally likely for every sample
    torch.testing.assert_close(sinkhorn_knopp(torch.zeros(4, 5)), torch.full((4, 5), 0.2))
    # two samples, each on its own prototype: exp(S / eps) is symmetric with equal row and column
    # sums, so the normalisation only rescales it: q = [[a, 1], [1, a]] / (a + 1), a = e^(1 / eps)
    a = math.exp(1 / 0.5)
    codes = sinkhorn_knopp(torch.eye(2), epsilon=0.5)
    torch.testing.assert_close(codes, torch.tensor([[a, 1.0], [1.0, a]]) / (a + 1))
    # many iterations reach the equipartition: every prototype gets B / K of the batch
    codes = sinkhorn_knopp(torch.tanh(randn(12, 4, seed=3)).float(), epsilon=0.3, iterations=200)
    torch.testing.assert_close(codes.sum(dim=0), torch.full((4,), 3.0), rtol=1e-4, atol=1e-4)


def test_sinkhorn_shared_columns_are_part_of_the_problem():
    """The queue's rows join the batch in the normalisation: the codes of the batch are those of
    Sinkhorn-Knopp over [queue; batch]."""
    batch, queue = torch.tanh(randn(4, 6, seed=1)).float(), torch.tanh(randn(8, 6, seed=2)).float()
    together = sinkhorn_knopp(torch.cat([queue, batch]))
    torch.testing.assert_close(sinkhorn_knopp(batch, shared_scores=queue), together[8:])
    assert not torch.allclose(sinkhorn_knopp(batch), together[8:], atol=1e-3)


def test_swapped_prediction_matches_loop_reference_and_hand_case():
    views, b, k, t = 4, 3, 5, 0.1
    scores = [torch.tanh(randn(b, k, seed=10 + v)).float() for v in range(views)]
    codes = [torch.softmax(randn(b, k, seed=20 + i).float(), dim=1) for i in range(2)]
    expected = 0.0
    for q, s in zip(codes, (0, 1)):
        for v in range(views):
            if v != s:
                log_p = torch.log_softmax(scores[v].double() / t, dim=1)
                expected += -sum(float((q[i].double() * log_p[i]).sum()) for i in range(b)) / b / (views - 1)
    got = swapped_prediction_loss(scores, codes, [0, 1], t)
    assert got.item() == pytest.approx(expected / 2, rel=1e-5)
    # uniform predictions: the cross entropy of any code is log K
    uniform = swapped_prediction_loss([torch.zeros(b, k)] * 3, codes, [0, 1], t)
    assert uniform.item() == pytest.approx(math.log(k), rel=1e-6)


# ----------------------------------------------------------------------------- VICReg


def reference_vicreg(z1, z2, lam, mu, nu, eps=1e-4):
    """The official VICReg.forward, written out with loops."""
    n, d = len(z1), len(z1[0])
    invariance = sum((z1[i][j] - z2[i][j]) ** 2 for i in range(n) for j in range(d)) / (n * d)
    variance = covariance = 0.0
    for z in (z1, z2):
        mean = [sum(z[i][j] for i in range(n)) / n for j in range(d)]
        c = [[z[i][j] - mean[j] for j in range(d)] for i in range(n)]
        var = [sum(c[i][j] ** 2 for i in range(n)) / (n - 1) for j in range(d)]
        variance += sum(max(0.0, 1 - math.sqrt(v + eps)) for v in var) / d / 2
        cov = [[sum(c[i][a] * c[i][b] for i in range(n)) / (n - 1) for b in range(d)] for a in range(d)]
        covariance += sum(cov[a][b] ** 2 for a in range(d) for b in range(d) if a != b) / d
    return lam * invariance + mu * variance + nu * covariance


@pytest.mark.parametrize("n,d,scale", [(4, 3, 0.5), (8, 5, 2.0), (16, 4, 0.1)])
def test_vicreg_matches_loop_reference(n, d, scale):
    z1, z2 = scale * randn(n, d, seed=n), scale * randn(n, d, seed=n + d)
    got = vicreg_loss(z1.float(), z2.float(), 25.0, 25.0, 1.0).item()
    assert got == pytest.approx(reference_vicreg(z1.tolist(), z2.tolist(), 25.0, 25.0, 1.0), rel=1e-4)


def test_vicreg_hand_worked_cases():
    # identical views, centred orthogonal columns of std sqrt(4/3) > 1: every term is 0
    h = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0], [1.0, -1.0, -1.0, 1.0]])
    z = h[:, 1:]
    assert vicreg_loss(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)
    # collapse to one point: std = sqrt(eps) = 0.01 in every dimension, so v = 0.99 for each view
    collapsed = torch.ones(4, 3)
    assert vicreg_loss(collapsed, collapsed.clone()).item() == pytest.approx(25 * 0.99, rel=1e-5)
    # perfectly correlated dimensions (copies of one column): C_01 = C_10 = var = 4/3, c = 2 (4/3)^2 / 2
    col = h[:, 1:2]
    assert vicreg_loss(col.repeat(1, 2), col.repeat(1, 2), 0.0, 0.0, 1.0).item() == pytest.approx(
        2 * (2 * (4 / 3) ** 2 / 2), rel=1e-5)


# ----------------------------------------------------------------------------- SimSiam, NNCLR


def test_negative_cosine_hand_cases_and_stop_gradient():
    e0, e1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert negative_cosine_loss(e0, 3 * e0).item() == pytest.approx(-1.0)
    assert negative_cosine_loss(e0, e1).item() == pytest.approx(0.0)
    assert negative_cosine_loss(e0, -e0).item() == pytest.approx(1.0)
    p, z = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    negative_cosine_loss(p, z).backward()
    assert z.grad is None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("n,d,t", [(3, 4, 0.1), (6, 8, 0.5)])
def test_nnclr_loss_matches_loop_reference(n, d, t):
    nearest, p = randn(n, d, seed=n), randn(n, d, seed=d)
    expected = 0.0
    for i in range(n):
        logits = [dot(unit(nearest[i]), unit(p[k])) / t for k in range(n)]
        expected += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    assert nnclr_loss(nearest.float(), p.float(), t).item() == pytest.approx(expected / n, rel=1e-5)


def test_nnclr_hand_case_and_gradient_to_predictions_only():
    for n, t in ((2, 1.0), (4, 0.1)):
        nearest, p = torch.eye(n, requires_grad=True), torch.eye(n, requires_grad=True)
        loss = nnclr_loss(nearest, p, t)
        # float32 cross entropy: logsumexp - logit, each ~1/t, so a few ulps of 1/t absolute
        assert loss.item() == pytest.approx(math.log(1 + (n - 1) * math.exp(-1 / t)), rel=1e-5, abs=1e-6 / t)
        loss.backward()
        assert nearest.grad is None and p.grad is not None


# ----------------------------------------------------------------------------- distillation


def test_cosine_distillation_hand_cases():
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    assert cosine_distillation_loss(torch.tensor([[3.0, 0.0], [0.0, 1.0]]), t).item() == pytest.approx(0.0)
    assert cosine_distillation_loss(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), t).item() == pytest.approx(1.5)
    s = torch.randn(2, 2, requires_grad=True)
    cosine_distillation_loss(s, t).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


def test_smooth_l1_distillation_whitens_the_teacher():
    teacher = torch.tensor([[1.0, 2.0, 3.0]])  # whitened: (-a, 0, a), a = 1 / sqrt(2/3 + 1e-5)
    a = 1 / math.sqrt(2 / 3 + 1e-5)
    assert smooth_l1_distillation_loss(torch.tensor([[-a, 0.0, a]]), teacher).item() == pytest.approx(0.0, abs=1e-6)
    # |x| < beta = 2: 0.5 x^2 / beta per element; the mean of (a^2 / 4, 0, a^2 / 4)
    assert smooth_l1_distillation_loss(torch.zeros(1, 3), teacher).item() == pytest.approx(a * a / 6, rel=1e-5)
    # beyond beta it is linear: |x| - beta / 2
    big = torch.tensor([[-a - 5, 0.0, a]])
    assert smooth_l1_distillation_loss(big, teacher).item() == pytest.approx((5 - 1) / 3, rel=1e-5)
    # the teacher's scale and offset do not matter (layer norm)
    assert smooth_l1_distillation_loss(torch.zeros(1, 3), 10 * teacher + 7).item() == pytest.approx(a * a / 6, rel=1e-4)
