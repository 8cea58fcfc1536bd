"""DINO: Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin, "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021. https://arxiv.org/abs/2104.14294

Self-distillation with no labels, laid out like the reference ``main_dino.py`` (student and teacher
networks, ``DINOLoss`` with its centre, the schedules), on any timm backbone (ViT or CNN). The
student sees every multi-crop view, one forward per resolution (``models.multicrop``); the teacher,
an EMA of the student, only the global ones.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_foundry.models.distributed import all_reduce_sum
from ssl_foundry.models.heads import DINOHead
from ssl_foundry.models.losses import dino_loss
from ssl_foundry.models.momentum import MomentumEncoder, cosine_momentum, without_stochastic_depth
from ssl_foundry.models.multicrop import forward_by_resolution, split_views
from ssl_foundry.models.registry import register_method


def teacher_temperature(step: int, warmup_steps: int, warmup_temp: float, temp: float) -> float:
    """DINO's teacher temperature (sec. 4.2 / appendix): linear from ``warmup_temp`` at step 0 to
    ``temp`` at step ``warmup_steps - 1`` (``np.linspace`` over the warmup), then constant."""
    if step >= warmup_steps:
        return temp
    if warmup_steps == 1:
        return warmup_temp
    return warmup_temp + (temp - warmup_temp) * step / (warmup_steps - 1)


class TeacherCenter(nn.Module):
    """The centre c of DINO's teacher outputs (sec. 3.1, eq. 4), an EMA of their mean over the
    *global* batch,

        c <- m c + (1 - m) (1 / B) sum_{i=1..B} g_t(x_i)

    and the teacher's probabilities with it: P_t(x) = softmax((g_t(x) - c) / t_t). Centering keeps
    one dimension from dominating, sharpening (t_t small) keeps the output from going uniform;
    together they avoid collapse. The mean is sum / count all-reduced over the ranks, so ranks may
    hold different numbers of rows (iBOT's masked patches). ``dim``: the prototypes K.
    """

    def __init__(self, dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    def probs(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        return F.softmax((logits.float() - self.center) / temperature, dim=-1)

    @torch.no_grad()
    def update(self, logits: torch.Tensor) -> None:
        totals = all_reduce_sum(torch.cat([logits.float().sum(dim=0), logits.new_tensor([logits.shape[0]]).float()]))
        count = totals[-1]
        batch_center = totals[:-1] / count.clamp(min=1)
        ema = self.momentum * self.center + (1 - self.momentum) * batch_center
        self.center.copy_(torch.where(count > 0, ema, self.center))  # no rows anywhere: keep c


class SelfDistillation(nn.Module):
    """What DINO, iBOT and DINOv2 share: a student (:meth:`student`: the backbone and its heads), a
    teacher that is its EMA without stochastic depth, and their schedules on the optimizer steps
    done (a buffer, so checkpoints carry it): the teacher momentum, cosine from ``momentum`` to 1
    (BYOL's schedule, DINO sec. 3.1); the teacher temperature, warmed up linearly from
    ``warmup_teacher_temp`` to ``teacher_temp`` over ``warmup_teacher_temp_steps``; the heads' last
    layer, frozen for the first ``freeze_last_layer_steps``. Multi-crop views (models.multicrop): 2
    global, then any local ones. The exported backbone is the teacher's, which these papers
    evaluate (DINO sec. 5.2: the teacher outperforms the student throughout training)."""

    num_views = 2  # global views; then any number of local views
    multi_crop = True
    exported_backbone = "teacher.module.backbone"

    def __init__(self, momentum: float, teacher_temp: float, warmup_teacher_temp: float,
                 warmup_teacher_temp_steps: int, freeze_last_layer_steps: int):
        super().__init__()
        self.base_momentum, self.teacher_temp, self.warmup_teacher_temp = momentum, teacher_temp, warmup_teacher_temp
        self.warmup_teacher_temp_steps, self.freeze_last_layer_steps = warmup_teacher_temp_steps, freeze_last_layer_steps
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def student(self) -> nn.ModuleDict:
        """The networks the teacher averages: ``backbone`` and the heads, by name."""
        raise NotImplementedError

    def make_teacher(self) -> None:
        """The teacher: a copy of the student, then its EMA (call once the student is built)."""
        self.teacher = without_stochastic_depth(MomentumEncoder(self.student()))

    def start_step(self) -> float:
        """Sets the heads' last-layer freezing for this step; returns its teacher temperature."""
        step = int(self.steps_done)
        for module in self.student().values():
            if isinstance(module, DINOHead):
                module.last_layer_frozen = step < self.freeze_last_layer_steps
        return teacher_temperature(step, self.warmup_teacher_temp_steps, self.warmup_teacher_temp, self.teacher_temp)

    def on_step_end(self, step: int, total_steps: int) -> None:
        """``step`` optimizer steps are done; the update after step k (0-based) uses m(k)."""
        self.teacher.update(self.student(), cosine_momentum(step - 1, total_steps, self.base_momentum))
        self.steps_done.fill_(step)


@register_method("dino")
class DINO(SelfDistillation):
    """Student g_s = head(backbone) and teacher g_t, an EMA of the student (Algorithm 1):

        for x in loader:                                  # a batch of images
            views = multi-crop(x)                         # 2 global views, then local views
            s = g_s(views); t = g_t(global views)         # t: no gradient
            P_t = softmax((t - c) / t_t)                  # centering and sharpening
            L = mean_{pairs} H(P_t(global i), softmax(s(view v) / t_s)),  v != i
            after each step: teacher <- m teacher + (1 - m) student, m cosine from ``momentum`` to 1
                             c <- center_momentum c + (1 - center_momentum) mean(t)

    The head is :class:`models.heads.DINOHead` (``head_layers`` linears, GELU, ``bottleneck_dim``,
    L2 norm, weight-normalised last layer to ``out_dim``; ``norm_last_layer`` freezes its norm). The
    student sees every view, one backbone call per resolution; the teacher the global views. The
    schedules are :class:`SelfDistillation`'s; the weight decay's is the trainer's
    (``train.weight_decay`` -> ``train.weight_decay_end``, cosine). Any timm backbone (ViT or CNN).
    """

    def __init__(self, backbone: nn.Module, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 head_layers: int = 3, head_batch_norm: bool = False, norm_last_layer: bool = True,
                 momentum: float = 0.996, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 warmup_teacher_temp: float = 0.04, warmup_teacher_temp_steps: int = 0, center_momentum: float = 0.9,
                 freeze_last_layer_steps: int = 0):
        super().__init__(momentum, teacher_temp, warmup_teacher_temp, warmup_teacher_temp_steps, freeze_last_layer_steps)
        self.backbone = backbone
        self.head = DINOHead(backbone.num_features, out_dim, hidden_dim, bottleneck_dim, head_layers, head_batch_norm,
                             norm_last_layer)
        self.make_teacher()
        self.center = TeacherCenter(out_dim, center_momentum)
        self.student_temp = student_temp

    def student(self) -> nn.ModuleDict:
        return nn.ModuleDict({"backbone": self.backbone, "head": self.head})

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        global_views, _ = split_views(views, self.num_views, "dino")
        temperature = self.start_step()
        student = self.head(forward_by_resolution(self.backbone, views)).chunk(len(views))
        teacher = self.teacher.module
        with torch.no_grad():
            teacher_logits = teacher.head(forward_by_resolution(teacher.backbone, global_views))
        teacher_probs = self.center.probs(teacher_logits, temperature).chunk(self.num_views)
        loss = dino_loss(list(student), list(teacher_probs), self.student_temp)
        self.center.update(teacher_logits)
        return {"loss": loss}
