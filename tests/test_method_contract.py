"""The method contract (models/method.py): every registered method declares it, the registry refuses a
class that does not, and ``Method.forward`` checks a batch against the declaration before the
method's maths sees it (view count, tensor rank, batch size, labels), naming ``data.views``."""
import pytest
import torch
import torch.nn as nn

from ssl_foundry.models.method import Method
from ssl_foundry.models.registry import method_class, method_names, register_method


class Probe(Method):
    """A method whose loss is the mean of its views, recording what it was given."""

    method_name = "probe"
    num_views = 2

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.seen: list[tuple] = []

    def compute_loss(self, views, labels=None):
        self.seen.append((len(views), labels))
        return {"loss": self.weight * sum(v.mean() for v in views)}


class MultiCropProbe(Probe):
    multi_crop = True


class LabelProbe(Probe):
    num_views = 1
    uses_labels = True


class ClipProbe(Probe):
    num_views = 1
    input_kind = "clip"


def images(batch: int = 4, size: int = 8) -> torch.Tensor:
    return torch.zeros(batch, 3, size, size)


def test_every_registered_method_declares_the_contract():
    for name in method_names():
        cls = method_class(name)
        assert issubclass(cls, Method) and cls.method_name == name
        assert isinstance(cls.num_views, int) and cls.num_views >= 1
        assert cls.input_kind in ("image", "clip") and isinstance(cls.uses_labels, bool)
        assert cls.compute_loss is not Method.compute_loss, f"{name} implements no compute_loss"
    assert {n for n in method_names() if method_class(n).uses_labels} == {"s4l", "sla"}
    assert {n for n in method_names() if method_class(n).input_kind == "clip"} == {
        "cpc", "shuffle_and_learn", "tcn", "video_mae"}


def test_the_registry_refuses_a_class_without_the_contract():
    with pytest.raises(TypeError, match="must derive from models.method.Method"):
        register_method("plain_module")(nn.Linear)

    class NoViews(Method):
        pass

    with pytest.raises(TypeError, match="must declare num_views"):
        register_method("no_views")(NoViews)

    class Audio(Probe):
        input_kind = "audio"

    with pytest.raises(TypeError, match="input_kind 'audio' is not one of image, clip"):
        register_method("audio")(Audio)
    assert not {"plain_module", "no_views", "audio"} & set(method_names())


def test_a_fixed_view_count_is_checked_before_the_maths():
    probe = Probe()
    assert probe([images(), images()])["loss"].item() == 0.0 and probe.seen == [(2, None)]
    for count in (1, 3):
        with pytest.raises(ValueError, match=rf"data.views: method 'probe' takes 2 view\(s\) per sample, the recipe "
                                             rf"makes {count}"):
            probe([images()] * count)
    assert probe.seen == [(2, None)]  # the maths never saw a bad batch
    with pytest.raises(ValueError, match=r"different batch sizes \[4, 2\]"):
        probe([images(4), images(2)])


def test_multi_crop_takes_its_global_views_then_any_local_views():
    probe = MultiCropProbe()
    probe([images(size=8), images(size=8)])
    probe([images(size=8), images(size=8), images(size=4), images(size=4), images(size=4)])
    assert [count for count, _ in probe.seen] == [2, 5]
    with pytest.raises(ValueError, match="takes 2 global view.*makes 1"):
        probe([images()])
    with pytest.raises(ValueError, match="2 global views must have one shape"):
        probe([images(size=8), images(size=4), images(size=4)])


def test_the_input_kind_fixes_the_tensor_rank():
    with pytest.raises(ValueError, match=r"probe takes clips of shape \(B, T, C, H, W\), got a tensor of shape "
                                         r"\(4, 3, 8, 8\): train it on clip shards"):
        ClipProbe()([images()])
    ClipProbe()([torch.zeros(4, 5, 3, 8, 8)])
    with pytest.raises(ValueError, match=r"probe takes images of shape \(B, C, H, W\)"):
        Probe()([torch.zeros(4, 5, 3, 8, 8)] * 2)


def test_labels_go_exactly_to_methods_that_take_them():
    labels = torch.tensor([0, -1, 3, 9])
    probe = LabelProbe()
    probe([images()], labels)
    assert probe.seen[0][1] is labels
    with pytest.raises(ValueError, match=r"takes the batch's labels, shape \(4,\), got None"):
        probe([images()])
    with pytest.raises(ValueError, match=r"shape \(4,\), got \(3,\)"):
        probe([images()], labels[:3])
    with pytest.raises(ValueError, match="probe takes no labels"):
        Probe()([images(), images()], labels)


def test_on_step_end_is_a_no_op_unless_a_method_needs_it():
    probe = Probe()
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    probe.on_step_end(1, 10)
    assert all(torch.equal(before[k], v) for k, v in probe.state_dict().items())
