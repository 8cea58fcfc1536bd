"""Backbones (models/backbones.py): a convolution with a 1x1 output computed as a matmul gives
timm's function and gradients, for the window each size of input reads, leaves the state dict
plain timm's, and can be turned back into timm's convolution."""
import pytest
import timm
import torch
import torch.nn as nn

from ssl_foundry.models.backbones import SingleOutputConv2d, create_backbone, single_output_convs, single_output_window


@pytest.mark.parametrize("conv,size,window", [
    (nn.Conv2d(4, 5, 3, stride=1, padding=1), (1, 1), (1, 1)),  # only the centre tap reads the input
    (nn.Conv2d(4, 5, 3, stride=2, padding=1), (2, 2), (2, 2)),  # ResNet layer4.0.conv1 on a 2x2 map
    (nn.Conv2d(4, 5, 3, stride=2, padding=1), (1, 1), (1, 1)),
    (nn.Conv2d(4, 5, 1, stride=2), (2, 2), (1, 1)),  # the downsample: the top-left input only
    (nn.Conv2d(4, 5, 3, stride=1, padding=1), (2, 2), None),  # a 2x2 output: the convolution
    (nn.Conv2d(4, 6, 3, stride=1, padding=1, groups=2), (1, 1), None),
    (nn.Conv2d(4, 5, (3, 1), stride=2, padding=(1, 0)), (2, 1), (2, 1)),
])
def test_the_window_a_single_output_reads(conv, size, window):
    assert single_output_window(size, conv) == window


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (2, 1), (3, 3)])
@pytest.mark.parametrize("kernel,stride,padding,bias", [(3, 1, 1, False), (3, 2, 1, True), (1, 2, 0, False),
                                                        (3, 3, 1, True)])
def test_single_output_conv_equals_the_convolution_with_gradients(size, kernel, stride, padding, bias):
    """Both paths: a 1x1 output (the matmul) and any other (the convolution)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 7, kernel, stride=stride, padding=padding, bias=bias)
    fast = SingleOutputConv2d(6, 7, kernel, stride=stride, padding=padding, bias=bias)
    fast.load_state_dict(conv.state_dict())
    x = torch.randn(5, 6, *size, requires_grad=True)
    x_fast = x.detach().clone().requires_grad_()
    expected, got = conv(x), fast(x_fast)
    torch.testing.assert_close(got, expected)
    upstream = torch.randn_like(expected)
    expected.backward(upstream)
    got.backward(upstream)
    torch.testing.assert_close(x_fast.grad, x.grad)
    torch.testing.assert_close(fast.weight.grad, conv.weight.grad)  # zero for the taps on padding, as the conv's
    if bias:
        torch.testing.assert_close(fast.bias.grad, conv.bias.grad)


@pytest.mark.parametrize("name", ["resnet18", "resnet10t"])
def test_backbone_is_timms_function_on_small_views(name):
    torch.manual_seed(0)
    reference = timm.create_model(name, num_classes=0)
    backbone = create_backbone(name)
    assert list(backbone.state_dict()) == list(reference.state_dict())
    backbone.load_state_dict(reference.state_dict())
    assert any(type(m) is SingleOutputConv2d for m in backbone.modules())
    for size in (16, 32):  # layer4 sees 1x1 and 2x2 maps: its convolutions take the matmul
        x = torch.randn(4, 3, size, size)
        expected, got = reference(x), backbone(x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        expected.square().sum().backward()
        got.square().sum().backward()
        for (param, ours), theirs in zip(backbone.named_parameters(), reference.parameters()):
            # fp32 sums in another order, through up to 18 layers: compared as whole tensors
            assert (ours.grad - theirs.grad).norm() <= 1e-4 * theirs.grad.norm(), param
        reference.zero_grad(), backbone.zero_grad()


def test_single_output_convs_can_be_turned_back_into_timms():
    backbone = single_output_convs(create_backbone("resnet10t"), enabled=False)  # the bench's reference loop
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is nn.Conv2d for m in convs)
