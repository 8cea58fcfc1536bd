"""Shuffle and Learn: Misra, Zitnick, Hebert, "Shuffle and Learn: Unsupervised Learning using
Temporal Order Verification", ECCV 2016. https://arxiv.org/abs/1603.08561

Temporal order verification: from five frames a < b < c < d < e of a video, the tuple
(f_b, f_c, f_d) is in the correct order -- a positive, and so is its reverse (f_d, f_c, f_b),
the paper treating both directions as correct -- while (f_b, f_a, f_d) and (f_b, f_e, f_d), whose
middle frame lies outside [b, d], are negatives. The three frames go through the same network
(a triplet Siamese network), their features are concatenated and a classifier says "in order"
or not, trained with cross-entropy.

Sampling, per tuple, from the T frames of a clip (torch RNG, so a seed reproduces it):
  - exactly ``round(positive_fraction * B)`` of the B tuples of a batch are positives, at random
    places in the batch; the paper trains with 25 % positives and 75 % negatives (its ablation
    over class ratios found more negatives better), hence the default 0.25;
  - a positive is uniform over the ordered triples b < c < d with d - b <= ``max_gap`` (the
    paper's tau_max, 60 frames at 30 fps there);
  - a negative is uniform over the triples (b, x, d) with b + 2 <= d <= b + ``max_gap`` (so that
    (b, c, d) would be a positive for some c, as in the paper's five-frame construction) and x
    outside [b, d] by at least ``min_gap`` frames (the paper's tau_min, 15 frames there): x <= b -
    min_gap or x >= d + min_gap;
  - with ``reverse`` each tuple, positive or negative, is presented in reverse order with
    probability 1/2, so the direction of time is no cue and only "is the middle frame between
    the other two" is.

The paper samples only from windows of high motion (mean optical flow), because tuples from static
stretches cannot be ordered. Here a clip is a short, evenly spaced run of T frames (a few
seconds at most) that the loader already drew from the video, and every tuple is sampled inside
that clip: there is no optical flow to compute at train time, and with a few frames spread over
seconds most clips of real video do move. A static clip gives tuples whose order no model can
see, i.e. label noise the loss cannot fit -- what the paper's motion filter avoids; selecting
moving clips belongs in data prep (a motion score per clip) rather than in the method. Gaps are in frames of the
clip, so ``max_gap`` / ``min_gap`` scale with data.clip_frames.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_foundry.models.registry import register_method
from ssl_foundry.models.video import clip_batch, encode_frames, require_frames, select_frames


def order_tuple_candidates(frames: int, max_gap: int, min_gap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All frame triples a clip of ``frames`` frames offers: ``(ordered, shuffled)``, (P, 3) and
    (Q, 3) long tensors. ``ordered``: (b, c, d), b < c < d, d - b <= max_gap. ``shuffled``:
    (b, x, d), 2 <= d - b <= max_gap, x <= b - min_gap or x >= d + min_gap."""
    b, c, d = torch.meshgrid(*(torch.arange(frames),) * 3, indexing="ij")
    span = d - b
    in_span = (span >= 2) & (span <= max_gap)
    ordered = (b < c) & (c < d) & in_span
    shuffled = ((c <= b - min_gap) | (c >= d + min_gap)) & in_span
    triples = torch.stack([b, c, d], dim=-1)
    return triples[ordered], triples[shuffled]


def sample_order_tuples(batch: int, frames: int, positive_fraction: float = 0.25, max_gap: int | None = None,
                        min_gap: int = 1, reverse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame indices (B, 3) of one tuple per clip and their labels (B,), 1 = in temporal order
    (either direction), 0 = middle frame outside the span; see the module docstring."""
    ordered, shuffled = order_tuple_candidates(frames, frames - 1 if max_gap is None else max_gap, min_gap)
    if len(ordered) == 0 or len(shuffled) == 0:
        raise ValueError(f"shuffle_and_learn: no {'ordered' if len(ordered) == 0 else 'shuffled'} tuple fits in "
                         f"{frames} frames with max_gap={max_gap}, min_gap={min_gap}: raise data.clip_frames, or raise "
                         f"model.method_args.max_gap / lower model.method_args.min_gap")
    positives = round(positive_fraction * batch)
    labels = (torch.arange(batch) < positives).long()[torch.randperm(batch)]
    pick_ordered = ordered[torch.randint(len(ordered), (batch,))]
    pick_shuffled = shuffled[torch.randint(len(shuffled), (batch,))]
    tuples = torch.where(labels.bool().unsqueeze(1), pick_ordered, pick_shuffled)
    if reverse:
        flip = torch.rand(batch) < 0.5
        tuples = torch.where(flip.unsqueeze(1), tuples.flip(1), tuples)
    return tuples, labels


@register_method("shuffle_and_learn")
class ShuffleAndLearn(nn.Module):
    """Temporal order verification: 3 frames -> backbone (shared) -> concatenated features ->
    classifier -> 2 logits, cross-entropy against the tuple's label.

    ``classifier_hidden_dim=0`` is the paper's head exactly, one linear layer (its fc8) on the
    concatenated features. That head scores a tuple as a *sum* of per-frame terms, w_1.f_b +
    w_2.f_c + w_3.f_d, and "is f_c between f_b and f_d" is not such a sum of frame-wise scores,
    so the whole burden of comparing frames falls on what each frame's features alone reveal.
    The default adds one hidden ReLU layer of ``classifier_hidden_dim`` units, which lets the
    head compare the frames; the head is thrown away after pretraining either way.
    """

    input_kind = "clip"
    num_views = 1

    def __init__(self, backbone: nn.Module, positive_fraction: float = 0.25, max_gap: int | None = None,
                 min_gap: int = 1, reverse: bool = True, classifier_hidden_dim: int = 512):
        super().__init__()
        if not 0.0 < positive_fraction < 1.0:
            raise ValueError(f"shuffle_and_learn: model.method_args.positive_fraction must be in (0, 1), "
                             f"got {positive_fraction} (the paper uses 0.25)")
        if max_gap is not None and max_gap < 2:
            raise ValueError(f"shuffle_and_learn: model.method_args.max_gap must be >= 2 frames (b < c < d), "
                             f"got {max_gap}; null means the whole clip")
        if min_gap < 1:
            raise ValueError(f"shuffle_and_learn: model.method_args.min_gap must be >= 1 frame, got {min_gap}")
        if classifier_hidden_dim < 0:
            raise ValueError(f"shuffle_and_learn: model.method_args.classifier_hidden_dim must be >= 0, "
                             f"got {classifier_hidden_dim}")
        self.backbone = backbone
        features = 3 * backbone.num_features
        if classifier_hidden_dim:
            self.classifier = nn.Sequential(nn.Linear(features, classifier_hidden_dim), nn.ReLU(inplace=True),
                                            nn.Linear(classifier_hidden_dim, 2))
        else:
            self.classifier = nn.Linear(features, 2)
        self.positive_fraction = positive_fraction
        self.max_gap = max_gap
        self.min_gap = min_gap
        self.reverse = reverse
        self.min_frames = self.frames_needed({"min_gap": min_gap})

    @staticmethod
    def frames_needed(args: dict) -> int:
        """The shortest clip with a negative tuple: x = 0, b = min_gap, d = b + 2."""
        return args["min_gap"] + 3

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        clips = clip_batch(views, "shuffle_and_learn")[0]
        batch, frames = clips.shape[:2]
        require_frames("shuffle_and_learn", frames, self.min_frames,
                       f"a negative tuple (a middle frame min_gap={self.min_gap} outside b < c < d)",
                       "model.method_args.min_gap")
        tuples, labels = sample_order_tuples(batch, frames, self.positive_fraction, self.max_gap, self.min_gap,
                                             self.reverse)
        tuples, labels = tuples.to(clips.device), labels.to(clips.device)
        features = encode_frames(self.backbone, select_frames(clips, tuples))  # (B, 3, F)
        logits = self.classifier(features.flatten(1))
        loss = F.cross_entropy(logits.float(), labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean().detach()
        return {"loss": loss, "accuracy": accuracy}
