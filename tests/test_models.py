"""Models: output shapes, the VGG-13 parameter count and initialisation, the DCGAN generator/discriminator,
the 2-D MLPs and the K+1-class classifier."""
import math

import pytest
import torch
import torch.nn as nn

import confident
from confident import (Discriminator, Generator, MLPGenerator, build_classifier, mlp, mlp_discriminator,
                       vgg13)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", ["vgg13", "alexnet", "simple_cnn"])
@pytest.mark.parametrize("width", [1.0, 0.0625])
@pytest.mark.parametrize("K", [10, 3])
def test_classifier_output_shape(name, width, K):
    model = build_classifier(name, K, width).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, K) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert model.ood_class is False


@pytest.mark.parametrize("name", ["vgg13", "alexnet", "simple_cnn"])
def test_build_classifier_ood_class_gives_k_plus_1_outputs(name):
    model = build_classifier(name, 10, 0.0625, ood_class=True)
    assert model.ood_class is True
    assert model(torch.rand(3, 3, 32, 32)).shape == (3, 11)


def test_vgg13_parameter_count_by_hand():
    # convs: 3x3 kernels with bias, channels 3-64-64 | 128-128 | 256-256 | 512-512 | 512-512 (REFERENCE.md)
    chans = [3, 64, 64, 128, 128, 256, 256, 512, 512, 512, 512]
    conv = sum(9 * cin * cout + cout for cin, cout in zip(chans[:-1], chans[1:]))
    assert conv == 1792 + 36928 + 73856 + 147584 + 295168 + 590080 + 1180160 + 3 * 2359808
    head = (512 * 512 + 512) * 2 + (512 * 10 + 10)          # Linear 512-512, 512-512, 512-K
    assert conv + head == 9_935_434
    model = vgg13(10, 1.0)
    assert _n_params(model) == 9_935_434
    assert round(_n_params(model) / 1e6, 1) == 9.9
    n_conv = sum(1 for m in model.modules() if isinstance(m, nn.Conv2d))
    n_pool = sum(1 for m in model.modules() if isinstance(m, nn.MaxPool2d))
    assert (n_conv, n_pool) == (10, 5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    drops = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops == [0.5, 0.5]


def test_vgg13_features_are_512x1x1_at_32x32():
    model = vgg13(10, 1.0)
    with torch.no_grad():
        f = model.features(torch.rand(1, 3, 32, 32))
    assert f.shape == (1, 512, 1, 1)


def test_vgg13_width_scales_every_layer():
    model = vgg13(10, 0.25)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 64, 64, 128, 128, 128, 128]
    lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lins] == [(128, 128), (128, 128), (128, 10)]


def test_vgg13_init_stds():
    torch.manual_seed(1)
    model = vgg13(10, 1.0).requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            want = math.sqrt(2.0 / (9 * m.out_channels))
            assert float(m.weight.std()) == pytest.approx(want, rel=0.05 if m.weight.numel() > 30_000 else 0.15)
            assert float(m.weight.mean()) == pytest.approx(0.0, abs=3 * want / math.sqrt(m.weight.numel()) + 1e-9)
            assert torch.count_nonzero(m.bias) == 0
        elif isinstance(m, nn.Linear):
            assert float(m.weight.std()) == pytest.approx(0.01, rel=0.05)
            assert torch.count_nonzero(m.bias) == 0


def test_generator_maps_noise_to_images_in_unit_interval():
    for width in (1.0, 0.0625):
        G = Generator(100, width=width)
        z = torch.randn(4, 100) * 5                         # large inputs: the Sigmoid still bounds the output
        x = G(z).detach()
        assert x.shape == (4, 3, 32, 32)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # the layer sizes of DCGAN (ngf=64): 100 -> 512 -> 256 -> 128 -> 3, no biases
    G = Generator(100)
    tconvs = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(t.in_channels, t.out_channels) for t in tconvs] == [(100, 512), (512, 256), (256, 128), (128, 3)]
    assert all(t.bias is None for t in tconvs)
    assert isinstance(G.net[-1], nn.Sigmoid)


def test_discriminator_returns_logits_per_image():
    for width in (1.0, 0.0625):
        D = Discriminator(width=width)
        out = D(torch.rand(5, 3, 32, 32))
        assert out.shape == (5,)
    D = Discriminator()
    convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 128), (128, 256), (256, 512), (512, 1)]
    assert not isinstance(list(D.net)[-1], nn.Sigmoid)      # logits: the Sigmoid lives in the BCE-with-logits loss


def test_dcgan_init():
    torch.manual_seed(2)
    G, D = Generator(100).requires_grad_(False), Discriminator().requires_grad_(False)
    for m in list(G.modules()) + list(D.modules()):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.weight.numel() > 10_000:
            assert float(m.weight.std()) == pytest.approx(0.02, rel=0.05)
        elif isinstance(m, nn.BatchNorm2d):
            assert float(m.weight.mean()) == pytest.approx(1.0, abs=0.01)
            assert torch.count_nonzero(m.bias) == 0


def test_mlp_shapes():
    net = mlp(2, 2)
    assert net(torch.randn(7, 2)).shape == (7, 2)
    assert [l.out_features for l in net if isinstance(l, nn.Linear)] == [500, 500, 2]
    G = MLPGenerator(100, 2)
    assert G(torch.randn(9, 100)).shape == (9, 2)
    D = mlp_discriminator(2)
    assert D(torch.randn(6, 2)).shape == (6,)


def test_unknown_model_name_is_a_config_error():
    with pytest.raises(confident.ConfidentError, match="resnet"):
        confident.resolve(confident.Config(model="resnet", in_data="mnist", out_data="gaussian"))


def _layers(seq: nn.Module) -> list:
    """Each layer as (type, the settings the reference names)."""
    out = []
    for m in seq:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            out.append((type(m).__name__, m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0],
                        m.bias is not None))
        elif isinstance(m, nn.Linear):
            out.append(("Linear", m.in_features, m.out_features))
        elif isinstance(m, nn.LeakyReLU):
            out.append(("LeakyReLU", m.negative_slope))
        elif isinstance(m, nn.Dropout):
            out.append(("Dropout", m.p))
        elif isinstance(m, nn.MaxPool2d):
            out.append(("MaxPool2d", m.kernel_size, m.stride))
        elif isinstance(m, nn.BatchNorm2d):
            out.append(("BatchNorm2d", m.num_features))
        else:
            out.append((type(m).__name__,))
    return out


def test_layers_in_order_as_the_authors_networks():
    """Written out from the reference notes on the authors' code: the DCGAN generator (4x4 transposed convolutions
    without bias, BatchNorm + ReLU between, Sigmoid out), the discriminator (4x4 convolutions without bias, LeakyReLU
    0.2, BatchNorm from the second; its final Sigmoid is inside our BCE-with-logits) and VGG-13 (3x3 convolutions
    with bias, padding 1, ReLU, no BatchNorm, max-pools; head 512-512-K with ReLU then Dropout 0.5)."""
    tc = "ConvTranspose2d"
    assert _layers(Generator(100).net) == [
        (tc, 100, 512, 4, 1, 0, False), ("BatchNorm2d", 512), ("ReLU",),
        (tc, 512, 256, 4, 2, 1, False), ("BatchNorm2d", 256), ("ReLU",),
        (tc, 256, 128, 4, 2, 1, False), ("BatchNorm2d", 128), ("ReLU",),
        (tc, 128, 3, 4, 2, 1, False), ("Sigmoid",)]
    assert _layers(Discriminator().net) == [
        ("Conv2d", 3, 128, 4, 2, 1, False), ("LeakyReLU", 0.2),
        ("Conv2d", 128, 256, 4, 2, 1, False), ("BatchNorm2d", 256), ("LeakyReLU", 0.2),
        ("Conv2d", 256, 512, 4, 2, 1, False), ("BatchNorm2d", 512), ("LeakyReLU", 0.2),
        ("Conv2d", 512, 1, 4, 1, 0, False)]
    want, c = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
        if v == "M":
            want.append(("MaxPool2d", 2, 2))
        else:
            want += [("Conv2d", c, v, 3, 1, 1, True), ("ReLU",)]
            c = v
    net = vgg13(10)
    assert _layers(net.features) == want
    assert _layers(net.head) == [("Linear", 512, 512), ("ReLU",), ("Dropout", 0.5),
                                 ("Linear", 512, 512), ("ReLU",), ("Dropout", 0.5), ("Linear", 512, 10)]


# --channels-last: the same networks and training steps in NHWC (auto: on for the CPU) and in NCHW
@pytest.mark.parametrize("method", ["ce", "conf", "joint", "joint-pt", "kplus1"])
def test_channels_last_training_steps_equal_nchw(method):
    """Three steps from the same weights, noise and dropout masks: NHWC and NCHW give the same losses and weights
    up to rounding (the two layouts sum the convolutions in other orders), and auto means NHWC on the CPU."""
    cpu = torch.device("cpu")
    assert confident.use_channels_last(confident.Config(), cpu)               # auto
    assert not confident.use_channels_last(confident.Config(channels_last="off"), cpu)
    assert not confident.use_channels_last(confident.Config(), torch.device("cuda"))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 16, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (3, 16), generator=g)
    xo = torch.rand(3, 16, 3, 32, 32, generator=g)
    runs = {}
    for fmt in ("on", "off"):
        cfg = confident.resolve(confident.Config(in_data="fashion-mnist", out_data="mnist", method=method,
                                                 width=0.0625, batch_size=16, lr=1e-3, channels_last=fmt))
        torch.manual_seed(0)
        tr = confident.Trainer(cfg, 10, cpu, log=lambda *a: None)
        nhwc = fmt == "on"
        w = tr.net.features[0].weight
        assert w.is_contiguous(memory_format=torch.channels_last) == nhwc and w.is_contiguous() == (not nhwc)
        logs = []
        for i in range(3):
            xb = x[i].contiguous(memory_format=torch.channels_last) if nhwc else x[i]
            logs.append({k: float(v) for k, v in tr.step(xb, y[i], xo[i]).items()})
        runs[fmt] = logs, {k: m.state_dict() for k, m in tr.modules().items()}
    (la, wa), (lb, wb) = runs["on"], runs["off"]
    for a, b in zip(la, lb):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (k, a[k], b[k])
    for name in wa:
        for k in wa[name]:
            assert torch.allclose(wa[name][k].float(), wb[name][k].float(), rtol=1e-3, atol=1e-5), (name, k)
