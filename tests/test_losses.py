"""NT-Xent against the paper's formula: a hand-worked case and a literal loop reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from ssl_foundry.models.losses import nt_xent_loss


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """Chen et al. 2020, eq. 1, summed over all 2N anchors by explicit loops."""
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2])]
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        sim = lambda a, b: float(z[a] @ z[b]) / t  # noqa: E731
        denominator = sum(math.exp(sim(i, k)) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(sim(i, j)) / denominator)
    return total / (2 * n)


def test_hand_worked_orthogonal_case():
    # Two images, each view identical to its pair; the images are orthogonal. For every anchor:
    # positive similarity 1, two negatives with similarity 0:  loss = log(1 + 2 e^{-1/t}).
    z = torch.eye(2)
    for t in (0.5, 0.1, 1.0):
        assert nt_xent_loss(z, z.clone(), t).item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / t)), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("n,d,t", [(3, 4, 0.5), (8, 16, 0.1), (5, 2, 1.0)])
def test_matches_loop_reference(n, d, t):
    g = torch.Generator().manual_seed(n * d)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    assert nt_xent_loss(z1, z2, t).item() == pytest.approx(reference_nt_xent(z1, z2, t), rel=1e-5)


def test_temperature_and_normalisation_matter():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    assert nt_xent_loss(z1, z2, 0.1).item() != pytest.approx(nt_xent_loss(z1, z2, 0.5).item(), rel=1e-3)
    # embeddings are L2-normalised: a per-sample rescaling changes nothing ...
    scale = torch.rand(6, 1, generator=g) * 10 + 0.1
    assert nt_xent_loss(z1 * scale, z2, 0.2).item() == pytest.approx(nt_xent_loss(z1, z2, 0.2).item(), rel=1e-5)
    # ... while the raw dot product (no normalisation) would have given a different loss
    raw = F.cross_entropy(
        (torch.cat([z1, z2]) @ torch.cat([z1, z2]).T / 0.2).fill_diagonal_(float("-inf")),
        torch.cat([torch.arange(6) + 6, torch.arange(6)]),
    )
    assert raw.item() != pytest.approx(nt_xent_loss(z1, z2, 0.2).item(), rel=1e-3)


def test_gradient_flows_to_both_views():
    z1, z2 = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    nt_xent_loss(z1, z2, 0.5).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
