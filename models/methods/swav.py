"""SwAV: Caron, Misra, Mairal, Goyal, Bojanowski, Joulin, "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments", NeurIPS 2020. https://arxiv.org/abs/2006.09882"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_foundry.models.distributed import gather_no_grad, set_parameter_
from ssl_foundry.models.heads import MLPHead
from ssl_foundry.models.losses import sinkhorn_knopp, swapped_prediction_loss
from ssl_foundry.models.multicrop import forward_by_resolution, split_views
from ssl_foundry.models.queues import KeyQueue
from ssl_foundry.models.registry import register_method


class Prototypes(nn.Linear):
    """K trainable prototype vectors c_k (rows of ``weight``) kept on the unit sphere: the official
    code renormalises them in place before every forward pass; here after every optimizer step
    (:meth:`normalize`, called by the method's ``on_step_end``) and once at construction, which
    is the same sequence of values."""

    def __init__(self, dim: int, num_prototypes: int):
        super().__init__(dim, num_prototypes, bias=False)
        self.normalize()

    def normalize(self) -> None:
        set_parameter_(self.weight, lambda w: F.normalize(w, dim=1))

    def forward(self, z: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """z . c_k for every prototype. ``frozen``: the prototypes get a zero gradient (not none:
        DDP and ZeRO expect a gradient of every trained parameter at every step)."""
        weight = self.weight.detach() + 0 * self.weight if frozen else self.weight
        return F.linear(z, weight)


@register_method("swav")
class SwAV(nn.Module):
    """Swapped prediction of online cluster assignments (sec. 3), with multi-crop (sec. 3.2):

        z_t = normalize(g(f(x_t)))                    for every view t (2 global + V local)
        scores_t = z_t . C                            C: K prototypes on the unit sphere
        q_s = SinkhornKnopp(scores_s / eps)           codes of the global views s (no gradient),
                                                      equipartitioned over the global batch
        L = 1/2 sum_s 1/(V + 1) sum_{t != s} -sum_k q_s^(k) log softmax(scores_t / tau)^(k)

    as the official ``main_swav.py``: projector 2048 (BN, ReLU) -> 128, 3000 prototypes, tau = 0.1,
    eps = 0.05, 3 Sinkhorn iterations over the global batch; views of the same size go through
    the backbone together (:func:`models.multicrop.forward_by_resolution`), the projector once
    on all. ``views`` is a list of (B, 3, h, w) tensors, the ``assign_views`` (the 2 global views,
    first) and any number of local views, possibly smaller.

    - ``queue_size`` > 0 (the small-batch recipes: 3840 at batch 256): from step
      ``queue_start_step`` on, the embeddings z_s of the last batches join the Sinkhorn problem
      (scored against the current prototypes) once the queue has filled, one queue per view in
      ``assign_views``. The queue is global (every rank's embeddings, gathered), which is the
      same set of columns as the official per-rank queues of ``queue_size / world_size``.
    - ``freeze_prototypes_steps``: the prototypes are not trained in the first steps (the
      official 313 iterations: one epoch at batch 4096). Their gradient is zero instead of none,
      so with momentum SGD/LARS the optimizer state sees the (radial) weight-decay term only,
      which the renormalisation removes.
    """

    num_views = 2  # global views, then any number of local views (models/multicrop.py)
    multi_crop = True

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 2048, proj_out_dim: int = 128,
                 num_prototypes: int = 3000, temperature: float = 0.1, epsilon: float = 0.05,
                 sinkhorn_iterations: int = 3, assign_views: tuple[int, ...] = (0, 1), queue_size: int = 0,
                 queue_start_step: int = 0, freeze_prototypes_steps: int = 313):
        super().__init__()
        self.backbone = backbone
        self.projector = MLPHead(backbone.num_features, proj_hidden_dim, proj_out_dim, num_layers=2)
        self.prototypes = Prototypes(proj_out_dim, num_prototypes)
        if not set(assign_views) <= set(range(self.num_views)):
            raise ValueError(f"SwAV's assign_views {list(assign_views)} must be global views (0 .. {self.num_views - 1})")
        self.assign_views = list(assign_views)
        self.queues = (nn.ModuleList(KeyQueue(queue_size, proj_out_dim, random_init=False) for _ in self.assign_views)
                       if queue_size else None)
        self.temperature, self.epsilon, self.sinkhorn_iterations = temperature, epsilon, sinkhorn_iterations
        self.queue_start_step, self.freeze_prototypes_steps = queue_start_step, freeze_prototypes_steps
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))  # checkpointed: exact resume

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        split_views(views, self.num_views, "SwAV")
        batch, steps_done = views[0].shape[0], int(self.steps_done)
        z = F.normalize(self.projector(forward_by_resolution(self.backbone, views)), dim=1)
        scores = self.prototypes(z, frozen=steps_done < self.freeze_prototypes_steps).split(batch)
        codes = [self.codes(i, z[view * batch:(view + 1) * batch], scores[view], steps_done)
                 for i, view in enumerate(self.assign_views)]
        return {"loss": swapped_prediction_loss(list(scores), codes, self.assign_views, self.temperature)}

    @torch.no_grad()
    def codes(self, index: int, z: torch.Tensor, scores: torch.Tensor, steps_done: int) -> torch.Tensor:
        """q of one assignment view: Sinkhorn-Knopp over the global batch, and the queue's past
        embeddings once it is full (read before this batch is enqueued)."""
        queued = None
        if self.queues is not None and steps_done >= self.queue_start_step:
            queue = self.queues[index]
            if queue.full:
                queued = self.prototypes(queue.keys)
            queue.enqueue(gather_no_grad(z.float()))
        return sinkhorn_knopp(scores, self.epsilon, self.sinkhorn_iterations, queued)

    def on_step_end(self, step: int, total_steps: int) -> None:
        self.steps_done.fill_(step)
        self.prototypes.normalize()
