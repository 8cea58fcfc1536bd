"""The classic pretext tasks and hybrids (RotNet, Jigsaw, relative patch location, context encoder,
colorization, Deep InfoMax, S4L, SLA): their targets on hand-checked cases, their losses against
the papers' formulas written as loops, the labelled subset of S4L, and a short real pretrain of
each through the CLI that exports a backbone plain timm loads."""
import itertools
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from ssl_foundry.models.backbones import create_backbone
from ssl_foundry.models.lab import ab_bin_centres, lab_to_rgb, rebalancing_weights, rgb_to_lab, soft_encode_ab
from ssl_foundry.models.losses import (aggregated_class_logits, dim_infonce_loss, dim_jsd_loss, joint_rotation_labels,
                                       labelled_cross_entropy, rebalanced_soft_cross_entropy, self_distillation_loss)
from ssl_foundry.models.methods.jigsaw import Jigsaw
from ssl_foundry.models.methods.relative_patch import NEIGHBOURS, RelativePatchLocation
from ssl_foundry.models.pretext import (GREEN_MAGENTA, central_mask, crop_tiles, drop_colour, grid_tile_offsets,
                                        grid_tile_size, hamming_permutation_set, project_colour, random_block_mask,
                                        rotate_all)
from ssl_foundry.models.registry import create_method
from ssl_foundry.pipeline.config import ConfigError, load_config
from ssl_foundry.pipeline.data.labelled_subset import labelled_keys, mask_unlabelled, shard_keys
from conftest import REPO, run_cli

PRETEXT_RECIPES = {  # recipe -> overrides that make its heads tiny
    "rotnet_resnet18_fmnist": [],
    "jigsaw_resnet18_fmnist": ["model.method_args.num_permutations=10", "model.method_args.tile_dim=16",
                               "model.method_args.hidden_dim=32"],
    "relative_patch_resnet18_fmnist": ["model.method_args.hidden_dim=32", "model.method_args.colour=drop"],
    "context_encoder_resnet18_fmnist": ["model.method_args.adversarial=true"],
    "colorization_resnet18_fmnist": ["model.method_args.decoder_min_dim=16"],
    "deep_infomax_resnet18_fmnist": ["model.method_args.critic_dim=16", "model.method_args.estimator=infonce"],
    "s4l_resnet18_fmnist": ["data.labelled_fraction=0.25"],
    "sla_resnet18_fmnist": [],
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- rotations


def test_rotate_all_gives_the_four_counter_clockwise_rotations_of_every_image_with_their_labels():
    x = torch.tensor([[[[1, 2], [3, 4]]], [[[5, 6], [7, 8]]]])  # (2, 1, 2, 2)
    rotated, labels = rotate_all(x)
    expected_first = [[[1, 2], [3, 4]], [[2, 4], [1, 3]], [[4, 3], [2, 1]], [[3, 1], [4, 2]]]  # 0, 90, 180, 270
    assert [rotated[2 * r, 0].tolist() for r in range(4)] == expected_first
    assert rotated[3, 0].tolist() == [[6, 8], [5, 7]]  # image 2 at 90 degrees
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="square"):
        rotate_all(torch.zeros(1, 3, 4, 6))


# ----------------------------------------------------------------------------- jigsaw permutations


def reference_algorithm_1(num_tiles: int, size: int, first: int) -> list[tuple[int, ...]]:
    """Noroozi & Favaro 2016, Algorithm 1, literally: P_bar all permutations, D = Hamming(P, P_bar),
    j = argmax 1^T D, P_bar loses its column j."""
    remaining = list(itertools.permutations(range(num_tiles)))
    chosen = [remaining.pop(first)]
    while len(chosen) < size:
        sums = [sum(sum(a != b for a, b in zip(p, q)) for p in chosen) for q in remaining]
        chosen.append(remaining.pop(sums.index(max(sums))))
    return chosen


def test_permutation_set_is_the_papers_greedy_maximal_hamming_set():
    first = int(torch.randint(24, (1,), generator=generator(3)))
    ours = hamming_permutation_set(12, num_tiles=4, seed=3)
    assert [tuple(p) for p in ours.tolist()] == reference_algorithm_1(4, 12, first)
    assert torch.equal(hamming_permutation_set(12, 4, seed=3), ours)  # deterministic by seed

    perms = hamming_permutation_set(100, num_tiles=9, seed=0)
    distances = (perms[:, None] != perms[None]).sum(dim=-1)
    off_diagonal = distances[~torch.eye(100, dtype=torch.bool)]
    # The paper's greedy maximises the summed distance, not the minimum: 100 of them keep pairs
    # at distance 2, with a mean above a random set's 8 (= 9 - 1).
    assert sorted(set(map(tuple, perms.tolist()))) == sorted(map(tuple, perms.tolist()))  # 100 distinct
    assert off_diagonal.min() == 2
    assert off_diagonal.float().mean() > 8.05
    # every pick after the first maximises the summed Hamming distance to the ones before it
    all_perms = torch.tensor(list(itertools.permutations(range(9))))
    for k in (1, 2, 50, 99):
        sums = (all_perms[:, None] != perms[None, :k]).sum(dim=(1, 2))
        sums[(all_perms[:, None] == perms[None, :k]).all(dim=-1).any(dim=1)] = -1  # already chosen
        assert sums[(all_perms == perms[k]).all(dim=1)].item() == sums.max().item()
    with pytest.raises(ValueError, match="permutation set size"):
        hamming_permutation_set(25, num_tiles=4)


# ----------------------------------------------------------------------------- tiles and patches


def test_grid_tiles_sit_in_their_cells_with_gaps_and_bounded_jitter():
    fixed = grid_tile_offsets(2, 12, 3, tile_size=2, max_jitter=0)  # cells of 4 px, margin 2 -> 1 px in
    assert fixed[0].tolist() == [[1, 1], [1, 5], [1, 9], [5, 1], [5, 5], [5, 9], [9, 1], [9, 5], [9, 9]]
    jittered = grid_tile_offsets(64, 30, 3, tile_size=6, max_jitter=1, generator=generator())  # centre 2
    cell_origin = fixed.new_tensor([[r * 10, c * 10] for r in range(3) for c in range(3)])
    inside = jittered - cell_origin
    assert inside.min() == 1 and inside.max() == 3 and len(inside.unique()) == 3
    image = torch.arange(2 * 3 * 12 * 12, dtype=torch.float32).reshape(2, 3, 12, 12)
    tiles = crop_tiles(image, fixed, 2)
    assert tiles.shape == (2, 9, 3, 2, 2)
    assert torch.equal(tiles[1, 5], image[1, :, 5:7, 9:11])
    with pytest.raises(ValueError, match="does not fit"):
        grid_tile_offsets(1, 12, 3, tile_size=5, max_jitter=0)


def test_grid_tile_size_follows_the_paper_ratio_and_names_the_fix_when_too_small():
    jigsaw_ratio = Jigsaw(create_backbone("resnet10t"), num_permutations=4, tile_dim=8, hidden_dim=8).tile_ratio
    # The paper: a 225 px crop, 75 px cells, 64 px tiles.
    assert grid_tile_size(225, 3, jigsaw_ratio, "jigsaw", "tile_ratio") == 64
    assert grid_tile_size(32, 3, jigsaw_ratio, "jigsaw", "tile_ratio") == 9
    with pytest.raises(ValueError, match=r"relative_patch: 12 px views .* model.method_args.patch_ratio"):
        grid_tile_size(12, 3, 0.7, "relative_patch", "patch_ratio")


def test_relative_patch_pairs_are_the_centre_and_the_labelled_neighbour():
    torch.manual_seed(0)
    model = RelativePatchLocation(create_backbone("resnet10t"), max_jitter=0, hidden_dim=8)
    image = torch.arange(16 * 3 * 30 * 30, dtype=torch.float32).reshape(16, 3, 30, 30)
    centre, neighbour, label = model.sample_pairs(image)  # 10 px cells, 7 px patches, 1 px in
    assert centre.shape == neighbour.shape == (16, 3, 7, 7)
    assert NEIGHBOURS == [0, 1, 2, 3, 5, 6, 7, 8]
    for b in range(16):
        assert torch.equal(centre[b], image[b, :, 11:18, 11:18])
        row, col = divmod(NEIGHBOURS[label[b]], 3)
        assert torch.equal(neighbour[b], image[b, :, 10 * row + 1:10 * row + 8, 10 * col + 1:10 * col + 8])
    assert len(label.unique()) > 4


def test_chromatic_aberration_countermeasures():
    patches = torch.rand(8, 3, 5, 5, generator=generator())
    dropped = drop_colour(patches, generator=generator(1))
    for p, d in zip(patches, dropped):
        kept = [c for c in range(3) if torch.equal(d[c], p[c])]
        assert len(kept) == 1  # one channel kept exactly, the other two are noise of 1 % of its std
        noise = torch.cat([d[c].flatten() for c in range(3) if c != kept[0]])
        assert 0 < noise.std() < 0.05 * p[kept[0]].std()
    projected = project_colour(patches)
    assert torch.allclose((projected * GREEN_MAGENTA[:, None, None]).sum(dim=1), torch.zeros(8, 5, 5), atol=1e-6)
    grey = torch.rand(2, 1, 4, 4).expand(-1, 3, -1, -1)
    assert torch.allclose(project_colour(grey), grey)  # grey has no green-magenta component


# ----------------------------------------------------------------------------- inpainting masks


def test_inpainting_masks():
    central = central_mask(2, 8)
    expected = torch.zeros(8, 8)
    expected[2:6, 2:6] = 1
    assert central.shape == (2, 1, 8, 8) and torch.equal(central[1, 0], expected)
    assert central[0].mean() == 0.25  # a quarter of the area
    blocks = random_block_mask(16, 16, num_blocks=4, fraction=0.25, generator=generator())
    corners = torch.randint(16 - 4 + 1, (16, 4, 2), generator=generator())  # the same draws
    for b in range(16):
        union = torch.zeros(16, 16)
        for r, c in corners[b].tolist():
            union[r:r + 4, c:c + 4] = 1
        assert torch.equal(blocks[b, 0], union)
    assert blocks.mean(dim=(1, 2, 3)).max() <= 0.25


# ----------------------------------------------------------------------------- colorization


def test_lab_round_trip_and_known_values():
    rgb = torch.rand(4, 3, 6, 6, generator=generator())
    assert (lab_to_rgb(rgb_to_lab(rgb)) - rgb).abs().max() < 1e-4
    known = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]).T[:, :, None]  # white, red, black
    lab = rgb_to_lab(known)[:, :, 0].T
    assert torch.allclose(lab[0], torch.tensor([100.0, 0.0, 0.0]), atol=1e-3)
    assert torch.allclose(lab[1], torch.tensor([53.2408, 80.0925, 67.2032]), atol=1e-3)  # the CIE/D65 value
    assert torch.allclose(lab[2], torch.zeros(3), atol=1e-6)


def test_ab_bins_and_soft_encoding():
    centres = ab_bin_centres()
    assert centres.shape == (262, 2)
    assert (centres % 10 == 0).all()
    assert centres[:, 0].min() == -90 and centres[:, 0].max() == 100  # Zhang et al.'s a range
    assert centres[:, 1].min() == -110 and centres[:, 1].max() == 90  # and b range
    grey_bin = int(((centres == 0).all(dim=1)).nonzero())
    encoded = soft_encode_ab(torch.zeros(1, 2, 1, 1), centres)[0, :, 0, 0]
    # the grey bin and its 4 neighbours at distance 10: Gaussian weights exp(-d^2 / 2 sigma^2), sigma 5
    near = math.exp(-100 / 50)
    assert encoded[grey_bin].item() == pytest.approx(1 / (1 + 4 * near), rel=1e-5)
    assert sorted(encoded[encoded > 0].tolist())[:4] == pytest.approx([near / (1 + 4 * near)] * 4, rel=1e-5)
    assert encoded.sum().item() == pytest.approx(1.0) and (encoded > 0).sum() == 5


def test_colorization_input_is_the_lightness_as_grey_and_a_grey_view_passes_unchanged():
    mean, std = (0.286,) * 3, (0.353,) * 3
    model = create_method("colorization", create_backbone("resnet10t"), pixel_mean=mean, pixel_std=std)
    grey_view = ((torch.rand(2, 1, 8, 8, generator=generator()) - 0.286) / 0.353).expand(-1, 3, -1, -1)
    grey_input, ab = model.lightness_and_ab(grey_view)
    assert (grey_input - grey_view).abs().max() < 1e-4 and ab.abs().max() < 1e-3
    red = (torch.tensor([1.0, 0.0, 0.0])[None, :, None, None].expand(1, 3, 2, 2) - 0.286) / 0.353
    red_input, red_ab = model.lightness_and_ab(red)
    assert torch.allclose(red_ab[0, :, 0, 0], torch.tensor([80.0925, 67.2032]), atol=1e-2)
    assert torch.allclose(red_input[0, 0], red_input[0, 1]) and torch.allclose(red_input[0, 1], red_input[0, 2])


def test_rebalancing_weights_on_a_hand_worked_case():
    far_apart = torch.tensor([[0.0, 0.0], [1000.0, 0.0], [0.0, 1000.0]])  # no smoothing across bins
    weights = rebalancing_weights(torch.tensor([2.0, 1.0, 1.0]), far_apart, mix=0.5)
    # p = (1/2, 1/4, 1/4): w ~ 1 / (0.5 p + 0.5 / 3) = (2.4, 3.4286, 3.4286), then E_p[w] = 1
    raw = torch.tensor([1 / (0.25 + 1 / 6), 1 / (0.125 + 1 / 6), 1 / (0.125 + 1 / 6)])
    assert torch.allclose(weights, raw / (0.5 * raw[0] + 0.25 * raw[1] + 0.25 * raw[2]), atol=1e-6)
    assert weights.tolist() == pytest.approx([0.82353, 1.17647, 1.17647], abs=1e-5)


def test_rebalanced_soft_cross_entropy_matches_the_formula():
    logits = torch.randn(2, 5, 3, 3, generator=generator(), dtype=torch.float64)
    targets = torch.softmax(torch.randn(2, 5, 3, 3, generator=generator(1), dtype=torch.float64), dim=1)
    weights = torch.rand(2, 3, 3, generator=generator(2), dtype=torch.float64)
    total = 0.0
    for n, h, w in itertools.product(range(2), range(3), range(3)):
        log_p = torch.log_softmax(logits[n, :, h, w], dim=0)
        total += -weights[n, h, w].item() * sum(targets[n, q, h, w].item() * log_p[q].item() for q in range(5))
    assert rebalanced_soft_cross_entropy(logits, targets, weights).item() == pytest.approx(total / 18, rel=1e-6)


# ----------------------------------------------------------------------------- Deep InfoMax


def softplus(z: float) -> float:
    return math.log1p(math.exp(z))


def test_dim_estimators_match_their_formulas():
    n, positions, dim = 3, 2, 4
    g = torch.randn(n, dim, generator=generator(), dtype=torch.float64)
    m = torch.randn(n, positions, dim, generator=generator(1), dtype=torch.float64)
    score = {(i, j, l): float(g[i] @ m[j, l]) for i in range(n) for j in range(n) for l in range(positions)}
    positive = [score[i, i, l] for i in range(n) for l in range(positions)]
    negative = [score[i, j, l] for i in range(n) for j in range(n) if j != i for l in range(positions)]
    jsd = sum(softplus(-s) for s in positive) / len(positive) + sum(softplus(s) for s in negative) / len(negative)
    assert dim_jsd_loss(g, m).item() == pytest.approx(jsd, rel=1e-6)  # computed in fp32, as every loss here
    nce = 0.0
    for i, l in itertools.product(range(n), range(positions)):
        candidates = [score[i, i, l]] + [score[i, j, k] for j in range(n) if j != i for k in range(positions)]
        nce += -(score[i, i, l] - math.log(sum(math.exp(s) for s in candidates)))
    assert dim_infonce_loss(g, m).item() == pytest.approx(nce / (n * positions), rel=1e-6)


# ----------------------------------------------------------------------------- S4L and SLA


def test_sla_joint_labels_aggregation_and_self_distillation():
    assert joint_rotation_labels(torch.tensor([2, -1, 0, 9]), torch.tensor([1, 3, 3, 0])).tolist() == [9, -1, 3, 36]
    batch, classes, rotations = 2, 3, 4
    joint = torch.randn(rotations * batch, classes * rotations, generator=generator(), dtype=torch.float64)
    aggregated = aggregated_class_logits(joint)
    for b, i in itertools.product(range(batch), range(classes)):
        # s_i(x) = (1/M) sum_j z_(i, j) on the copy rotated by j (row j * B + b)
        expected = sum(joint[j * batch + b, i * rotations + j].item() for j in range(rotations)) / rotations
        assert aggregated[b, i].item() == pytest.approx(expected, rel=1e-12)
    student = torch.randn(batch, classes, generator=generator(1), dtype=torch.float64, requires_grad=True)
    p_teacher, log_p_student = torch.softmax(aggregated, dim=1), torch.log_softmax(student, dim=1)
    kl = sum((p_teacher[b, i] * (p_teacher[b, i].log() - log_p_student[b, i])).item()
             for b in range(batch) for i in range(classes)) / batch
    teacher = aggregated.clone().requires_grad_(True)
    loss = self_distillation_loss(student, teacher)
    assert loss.item() == pytest.approx(kl, rel=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad is not None  # the aggregated teacher is a fixed target


def test_s4l_and_sla_losses_add_up_over_labelled_images_only():
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([3, -1, 0, -1])
    s4l = create_method("s4l", create_backbone("resnet10t"), rotation_weight=0.5).eval()
    with torch.no_grad():
        out = s4l([images], labels)
        rotated, rotation = rotate_all(images)
        features = s4l.backbone(rotated)
        supervised = F.cross_entropy(s4l.class_head(features[[0, 2]]), labels[[0, 2]])
        rotation_loss = F.cross_entropy(s4l.rotation_head(features), rotation)
    assert out["loss"].item() == pytest.approx((supervised + 0.5 * rotation_loss).item(), rel=1e-5)
    assert labelled_cross_entropy(torch.randn(2, 5), torch.tensor([-1, -1])).item() == 0.0

    sla = create_method("sla", create_backbone("resnet10t"), distillation_ce_weight=1.0).eval()
    with torch.no_grad():
        out = sla([images], labels)
        features = sla.backbone(rotated)
        joint = sla.joint_head(features)
        known = torch.tensor([0, 2])
        rows = torch.cat([known + 4 * r for r in range(4)])
        sla_loss = F.cross_entropy(joint[rows], joint_rotation_labels(labels.repeat(4), rotation)[rows])
        plain = sla.class_head(features[:4])
        expected = (sla_loss + self_distillation_loss(plain[known], aggregated_class_logits(joint)[known])
                    + F.cross_entropy(plain[known], labels[known]))
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_s4l_labels_exactly_the_fraction_asked_for_deterministically_by_seed(fmnist):
    folder = str(fmnist / "train")
    keys = shard_keys(folder)
    assert len(keys) == 128 and len(set(keys)) == 128
    subset = labelled_keys(folder, 0.1, seed=0)
    assert len(subset) == round(0.1 * 128) == 13 and subset <= set(keys)
    assert labelled_keys(folder, 0.1, seed=0) == subset  # same seed, same keys
    assert labelled_keys(folder, 0.1, seed=1) != subset  # another seed, another subset
    assert len(labelled_keys(folder, 0.5, seed=1)) == 64 and labelled_keys(folder, 1.0, seed=0) == set(keys)
    batch_keys = sorted(keys)[:8]
    masked = mask_unlabelled(torch.arange(8), batch_keys, subset)
    assert masked.tolist() == [i if k in subset else -1 for i, k in enumerate(batch_keys)]
    with pytest.raises(ValueError, match="labels none"):
        labelled_keys(folder, 0.001, seed=0)


def test_config_rejects_a_bad_or_unused_labelled_fraction_and_mismatched_colour_statistics():
    recipe = REPO / "configs" / "s4l_resnet18_fmnist.yaml"
    for bad in ("0", "1.5"):
        with pytest.raises(ConfigError, match=r"data.labelled_fraction must be in \(0, 1\]"):
            load_config(recipe, [f"data.labelled_fraction={bad}"], check_paths=False)
    with pytest.raises(ConfigError, match="method 'rotnet' takes no labels.*s4l, sla"):
        load_config(REPO / "configs" / "rotnet_resnet18_fmnist.yaml", ["data.labelled_fraction=0.1"],
                    check_paths=False)
    with pytest.raises(ConfigError, match="model.method_args.pixel_mean.*data.mean"):
        load_config(REPO / "configs" / "colorization_resnet18_fmnist.yaml", ["data.mean=[0.5,0.5,0.5]"],
                    check_paths=False)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(PRETEXT_RECIPES))
def test_pretext_pretrain_through_cli_exports_a_timm_backbone(recipe, fmnist, tmp_path):
    out = tmp_path / "run"
    done = run_cli([
        "pretrain", f"configs/{recipe}.yaml", f"output_dir={out}",
        f"data.train={fmnist}/train", f"data.eval_train={fmnist}/train", f"data.eval_test={fmnist}/test",
        "data.num_workers=0", "data.shuffle_buffer=16", "model.backbone=resnet10t",
        "train.max_steps=2", "train.batch_size=8", "train.log_every=1", "train.warmup_steps=0",
        "train.threads=1", "train.precision=fp32", "eval.after_pretrain=false", "mlflow.registered_model=",
        *PRETEXT_RECIPES[recipe],
    ], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 2 and math.isfinite(result["final_loss"])
    backbone = timm.create_model(f"local-dir:{result['backbone_dir']}", pretrained=True).eval()
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, backbone.num_features) and torch.isfinite(features).all()
