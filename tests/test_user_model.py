"""train() and Trainer on the caller's own network and data: every regime, the GAN regimes with the built-in or the
caller's own generator and discriminator, Datasets and DataLoaders, and the errors a library caller gets (naming
Config fields and their own arguments, never CLI flags or data sets they did not use)."""
import dataclasses
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import confident
from confident import Config, ConfidentError


def _quiet(*a, **k):
    pass


class SmallNet(nn.Module):
    """A network of the caller's: conv, BatchNorm, global pooling, K (or K + 1) logits; any image size."""

    def __init__(self, k=3, c=3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, k))

    def forward(self, x):
        return self.body(x)


class FlatG(nn.Module):
    """A generator of the caller's for images (c, s, s): one linear layer and a sigmoid."""

    def __init__(self, nz, c, s):
        super().__init__()
        self.shape, self.lin = (c, s, s), nn.Linear(nz, c * s * s)

    def forward(self, z):
        return torch.sigmoid(self.lin(z)).view(len(z), *self.shape)


def flat_d(c, s):
    return nn.Sequential(nn.Flatten(), nn.Linear(c * s * s, 1))          # (B, 1) logits


def _data(n=32, c=3, s=32, k=3):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, c, s, s, generator=g), torch.randint(0, k, (n,), generator=g)


def _cfg(method, **kw):
    return Config(**{**dict(method=method, epochs=1, batch_size=8, width=0.0625, log_every=10 ** 9), **kw})


@pytest.mark.parametrize("method", ["ce", "conf", "conf-gan", "joint", "joint-pt", "kplus1"])
def test_every_regime_trains_the_callers_model_in_place(method):
    x, y = _data()
    net = SmallNet(k=3 + (method == "kplus1"))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ood = torch.rand(20, 3, 32, 32) if method in ("conf", "kplus1") else None
    tr = confident.train(_cfg(method), x, y, x_ood=ood, model=net, log=_quiet)
    assert tr.raw["net"] is net and net.training
    assert not torch.equal(before["body.0.weight"], net.body[0].weight)
    assert getattr(net, "ood_class", False) == (method == "kplus1")
    w = net.body[0].weight                                    # the caller's memory format, on the CPU too
    assert not w.is_contiguous(memory_format=torch.channels_last) and w.device.type == "cpu"


def test_kplus1_needs_k_plus_1_outputs():
    x, y = _data()
    with pytest.raises(ConfidentError, match=r"model: output of shape \(8, 3\).*expected logits of shape \(8, 4\)"
                                             r".*K \+ 1 = 4 outputs"):
        confident.train(_cfg("kplus1"), x, y, x_ood=x, model=SmallNet(k=3), log=_quiet)


def test_gan_regimes_on_other_image_sizes_need_the_callers_gan():
    x, y = _data(c=1, s=28)
    with pytest.raises(ConfidentError, match=r"built-in DCGAN generator and discriminator .* 32x32 images; yours "
                                             r"are 28x28: pass your own as generator= and discriminator="):
        confident.train(_cfg("joint"), x, y, model=SmallNet(c=1), log=_quiet)
    with pytest.raises(ConfidentError, match="DCGAN discriminator .* pass your own as discriminator="):
        confident.train(_cfg("joint"), x, y, model=SmallNet(c=1), generator=FlatG(100, 1, 28), log=_quiet)
    G, D = FlatG(100, 1, 28), flat_d(1, 28)
    tr = confident.train(_cfg("joint-pt"), x, y, model=SmallNet(c=1), generator=G, discriminator=D, log=_quiet)
    assert tr.raw["G"] is G and tr.raw["D"] is D and tr.global_step == 4
    with pytest.raises(ConfidentError, match=r"generator: samples of shape \(8, 1, 28, 28\), expected images shaped "
                                             r"like the batch, \(8, 1, 30, 30\)"):
        confident.train(_cfg("joint"), *_data(c=1, s=30), model=SmallNet(c=1), generator=G,
                        discriminator=flat_d(1, 30), log=_quiet)


def test_the_built_in_gan_takes_the_callers_channels():
    """A 1-channel model of the caller's gets 1-channel batches (no copy to 3), and the built-in DCGAN makes
    1-channel samples for it."""
    x, y = _data(c=1)
    tr = confident.train(_cfg("joint"), x, y, model=SmallNet(c=1), log=_quiet)
    assert tr.G(torch.randn(2, 100)).shape == (2, 1, 32, 32)


def test_a_dataset_trains_as_the_same_tensors_do():
    """A Dataset of (x, y) is batched in the order the tensors are: the same model, bit for bit."""
    x, y = _data()
    a, b = SmallNet(), SmallNet()
    b.load_state_dict(a.state_dict())
    cfg = _cfg("conf", epochs=2)
    ood = torch.rand(20, 3, 32, 32)
    confident.train(cfg, x, y, x_ood=ood, model=a, log=_quiet)
    confident.train(cfg, TensorDataset(x, y), x_ood=TensorDataset(ood), model=b, num_classes=3, log=_quiet)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_dataloader_is_iterated_as_it_is():
    x, y = _data(n=30)
    lines = []
    loader = DataLoader(TensorDataset((x * 255).to(torch.uint8), y), batch_size=7, shuffle=True)
    tr = confident.train(_cfg("joint", log_every=1), loader, model=SmallNet(), num_classes=3, log=lines.append)
    assert tr.global_step == 5                                # its own batch size: 5 batches, the last of 2
    assert any("step 5/5" in m for m in lines)
    with pytest.raises(ConfidentError, match="pass num_classes="):
        confident.train(_cfg("ce"), loader, model=SmallNet(), log=_quiet)
    with pytest.raises(ConfidentError, match=r"x_train: training labels in \[0, 2\] in batch 1, expected \[0, 2\)"):
        confident.train(_cfg("ce"), loader, model=SmallNet(k=2), num_classes=2, log=_quiet)


def test_trainer_step_in_a_users_loop():
    """The loop of Trainer's docstring: one mini-batch of Algorithm 1 per call."""
    x, y = _data()
    net = SmallNet()
    tr = confident.Trainer(Config(method="joint", beta=1.0, width=0.0625), num_classes=3, model=net)
    for epoch in range(2):
        for i in range(0, 32, 8):
            logs = tr.step(x[i:i + 8], y[i:i + 8])
        tr.end_epoch()
    assert set(logs) == {"d", "g", "d_acc_real", "d_acc_fake", "c", "gnorm", "acc"}
    assert tr.global_step == 8 and tr.epoch == 2
    with pytest.raises(ConfidentError, match="Config.method 'conf' trains on real OOD images: expected a batch x_out"):
        confident.Trainer(Config(method="conf"), num_classes=3, model=net).step(x[:8], y[:8])


def test_device_is_the_models_own_unless_given():
    net = SmallNet()
    tr = confident.Trainer(Config(method="ce"), 3, model=net)
    assert tr.device == torch.device("cpu") and tr.net is net


# ------------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("change,message", [
    (dict(model="nope"), "Config.model 'nope': unknown model, expected one of vgg13, alexnet, simple_cnn"),
    (dict(method="joint2"), "Config.method 'joint2': unknown method, expected one of ce, conf"),
    (dict(batch_size=0), "Config.batch_size 0: expected >= 2"),
    (dict(lr=-1.0), r"Config.lr -1.0: expected > 0"),
    (dict(lr=float("inf")), "Config.lr inf: expected a finite number"),
    (dict(epochs=1.5), "Config.epochs 1.5: expected an integer"),
    (dict(beta="1"), "Config.beta '1': expected a number"),
    (dict(width=0.0), r"Config.width 0.0: expected in \(0, 8\]"),
    (dict(g_ema=1.5), r"Config.g_ema 1.5: expected in \[0, 1\)"),
    (dict(method="ce", g_ema=0.9), "Config.g_ema is a stabiliser of joint training: expected Config.method joint"),
])
def test_train_checks_its_config_up_front_naming_config_fields(change, message):
    x, y = _data()
    with pytest.raises(ConfidentError, match=message) as e:
        confident.train(dataclasses.replace(_cfg("joint"), **change), x, y, log=_quiet)
    assert "--" not in str(e.value)                           # no CLI flag
    with pytest.raises(ConfidentError, match=message):        # Trainer checks the same
        confident.Trainer(dataclasses.replace(_cfg("joint"), **change), 3)


def test_a_network_as_config_model_is_refused_with_the_way_in():
    with pytest.raises(ConfidentError, match=r"Config.model is a SmallNet: expected the name of a built-in network "
                                             r".*pass your own network as train\(cfg, ..., model=net\)") as e:
        confident.train(Config(model=SmallNet()), *_data(), log=_quiet)
    assert "Conv2d" not in str(e.value)                       # the network is not printed


def test_the_cli_still_names_its_flags():
    with pytest.raises(ConfidentError, match="--batch-size 0: expected >= 2"):
        confident.resolve(Config(in_data="fashion-mnist", out_data="mnist", batch_size=0))
    with pytest.raises(ConfidentError, match="--g-ema 1.5"):
        confident.resolve(Config(in_data="fashion-mnist", out_data="mnist", g_ema=1.5))


def test_data_errors_name_the_callers_arguments():
    x, y = _data()
    cases = [((x, y[:-1]), "x_train: training images of shape"),
             ((x.to(torch.int64), y), "x_train: training images of type"),
             ((x[:4], y[:4]), r"x_train: 4 training images, fewer than one batch of 8 \(Config.batch_size\)"),
             ((x[:, :, :28, :28], y), r"x_train: training images of shape \(N, 3, 28, 28\): expected "
                                      r"\(N, 1 or 3, 32, 32\) "
                                      r"for the built-in networks \(any \(N, C, H, W\) with your own network")]
    for (xa, ya), message in cases:
        with pytest.raises(ConfidentError, match=message) as e:
            confident.train(_cfg("ce", model="simple_cnn"), xa, ya, log=_quiet)
        assert "svhn" not in str(e.value) and "--" not in str(e.value)
    with pytest.raises(ConfidentError, match="Config.method conf needs OOD training images: expected x_ood"):
        confident.train(_cfg("conf"), x, y, model=SmallNet(), log=_quiet)


def test_evaluate_names_config_val_size_and_the_callers_sets():
    """A default Config (in_data "svhn", val_size 1000) and the caller's own 50 images: the message names the
    caller's argument and Config.val_size, not a set or a flag they never used."""
    net = SmallNet().eval()
    with pytest.raises(ConfidentError, match=r"x_in: 50 images, need more than Config.val_size 1000") as e:
        confident.evaluate(net, torch.rand(50, 3, 32, 32), torch.zeros(50, dtype=torch.long), {}, Config(),
                           log=_quiet)
    assert "svhn" not in str(e.value) and "--" not in str(e.value)
    with pytest.raises(ConfidentError, match=r"OOD set ood_sets\['mine'\]: 5 images, need more than "
                                             r"Config.val_size 10"):
        confident.evaluate(net, torch.rand(20, 3, 32, 32), torch.zeros(20, dtype=torch.long),
                           {"mine": torch.rand(5, 3, 32, 32)}, Config(val_size=10), log=_quiet)


def test_global_random_state_is_given_back_also_on_failure():
    torch.manual_seed(5)
    np.random.seed(6)
    random.seed(7)
    x, y = _data()
    a, b = SmallNet(), SmallNet(k=3)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    confident.train(_cfg("joint"), x, y, model=a, log=_quiet)
    with pytest.raises(ConfidentError):                       # fails inside the first step, after seeding
        confident.train(_cfg("kplus1"), x, y, x_ood=x, model=b, log=_quiet)
    after = (torch.get_rng_state(), np.random.get_state()[1], random.getstate())
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]


# ------------------------------------------------------------------------------------------------
# What a caller's data and arguments commonly look like: int32 labels, 0-255 floats, a str folder, a wrong device,
# batches for Trainer.step by hand, a DataLoader that fails, detector grids as one number or a string.

@pytest.mark.parametrize("method", ["ce", "conf", "joint"])
def test_int32_labels_train_exactly_as_int64(method):
    x, y = _data()
    ood = torch.rand(16, 3, 32, 32) if method == "conf" else None
    a, b = SmallNet(), SmallNet()
    b.load_state_dict(a.state_dict())
    confident.train(_cfg(method), x, y, x_ood=ood, model=a, log=_quiet)
    confident.train(_cfg(method), x, y.int(), x_ood=ood, model=b, log=_quiet)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    loader = DataLoader(TensorDataset(x, y.int()), batch_size=8)
    confident.train(_cfg("ce"), loader, model=SmallNet(), num_classes=3, log=_quiet)


def test_losses_and_calibration_take_int32_labels():
    z, y = torch.randn(6, 4), torch.tensor([0, 3, -1, 1, -1, 2])
    assert torch.equal(confident.confidence_loss(z, y.int(), 0.5), confident.confidence_loss(z, y, 0.5))
    assert torch.equal(confident.kplus1_loss(z[:3], y[:2].abs().int().repeat(2)[:3], z[3:]),
                       confident.kplus1_loss(z[:3], y[:2].abs().repeat(2)[:3], z[3:]))
    lab = torch.tensor([0, 3, 1, 1, 2, 2])
    assert confident.fit_temperature(z, lab.int()) == confident.fit_temperature(z, lab)


def test_float_images_outside_0_1_are_refused_before_training():
    x, y = _data()
    with pytest.raises(ConfidentError, match=r"x_train: training images: float images with values in \[.*, 255\]"):
        confident.train(_cfg("ce"), x * 255, y, model=SmallNet(), log=_quiet)
    with pytest.raises(ConfidentError, match=r"x_ood: OOD training images: float images with values in \[-"):
        confident.train(_cfg("conf"), x, y, x_ood=x - 0.5, model=SmallNet(), log=_quiet)
    with pytest.raises(ConfidentError, match=r"x_train: training images \(batch 1\): float images"):
        confident.train(_cfg("ce"), DataLoader(TensorDataset(x * 255, y), batch_size=8), model=SmallNet(),
                        num_classes=3, log=_quiet)
    with pytest.raises(ConfidentError, match=r"x_ood: OOD training images \(for batch 1\): float images"):
        confident.train(_cfg("conf"), x, y, x_ood=DataLoader(TensorDataset(x * 255), batch_size=8),
                        model=SmallNet(), log=_quiet)


def test_an_ood_loaders_own_error_is_not_hidden():
    class Broken(torch.utils.data.Dataset):                   # e.g. images left as PIL images: collate fails
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return object()
    x, y = _data()
    with pytest.raises(TypeError, match="default_collate"):
        confident.train(_cfg("conf"), x, y, x_ood=DataLoader(Broken(), batch_size=8), model=SmallNet(), log=_quiet)


def test_out_dir_as_a_string_and_config_device(tmp_path):
    x, y = _data()
    confident.train(_cfg("ce"), x, y, out_dir=str(tmp_path), model=SmallNet(), log=_quiet)
    assert (tmp_path / "train_state.pt").is_file()
    if not torch.cuda.is_available():
        with pytest.raises(ConfidentError, match="Config.device cuda:7: no CUDA device here"):
            confident.train(_cfg("ce", device="cuda:7"), x, y, log=_quiet)
    with pytest.raises(ConfidentError, match="Config.device 'gpu': expected auto, cpu, cuda or cuda:N"):
        confident.train(_cfg("ce", device="gpu"), x, y, log=_quiet)
    tr = confident.train(_cfg("ce", device="cpu"), x, y, log=_quiet)
    assert next(tr.raw["net"].parameters()).device.type == "cpu"


@pytest.mark.parametrize("method", ["ce", "joint", "conf-gan"])
def test_x_ood_is_refused_where_the_regime_does_not_use_it(method):
    x, y = _data()
    with pytest.raises(ConfidentError, match=f"x_ood: Config.method {method} trains on no real OOD images"):
        confident.train(_cfg(method), x, y, x_ood=x, model=SmallNet(), log=_quiet)


def test_trainer_step_checks_its_batches():
    x, y = _data(n=8)
    tr = confident.Trainer(_cfg("joint"), 3, model=SmallNet(), log=_quiet)
    assert set(tr.step(x, y.int())) >= {"c", "g", "d"}                      # int32 labels
    with pytest.raises(ConfidentError, match=r"step: x \(8, 3, 32, 32\) torch.uint8: expected float images"):
        tr.step((x * 255).to(torch.uint8), y)
    with pytest.raises(ConfidentError, match=r"step: labels y \(7,\)"):
        tr.step(x, y[:7])
    gray = confident.Trainer(_cfg("joint"), 3, model=SmallNet(c=1), log=_quiet)
    with pytest.raises(ConfidentError, match=r"the GAN makes and reads images of \(3, 32, 32\) \(Trainer\(image_shape"):
        gray.step(x[:, :1], y)
    ok = confident.Trainer(_cfg("joint"), 3, model=SmallNet(c=1), image_shape=(1, 32, 32), log=_quiet)
    assert "c" in ok.step(x[:, :1], y)
    conf = confident.Trainer(_cfg("conf"), 3, model=SmallNet(), log=_quiet)
    with pytest.raises(ConfidentError, match=r"step: x_out \(8, 3, 32, 32\) torch.uint8: expected float OOD"):
        conf.step(x, y, (x * 255).to(torch.uint8))
    with pytest.raises(ConfidentError, match=r"step: x_out \(8, 3, 16, 16\).*the shape of x"):
        conf.step(x, y, x[:, :, :16, :16])


def test_detector_grids_take_one_number_and_refuse_strings():
    net = SmallNet().eval()
    x = _data(n=6)[0]
    assert torch.equal(confident.odin_grid(net, x, 1000, 0.001), confident.odin_grid(net, x, [1000], [0.001]))
    assert torch.equal(confident.odin_grid(net, x, torch.tensor([1.0, 10.0]), np.array([0.0])),
                       confident.odin_grid(net, x, [1, 10], [0]))
    with pytest.raises(ConfidentError, match=r"ODIN temperatures '1,10': a string, expected a list of numbers"):
        confident.odin_grid(net, x, "1,10", [0])
    with pytest.raises(ConfidentError, match=r"energy temperature '1': a string, expected a number"):
        confident.energy_scores(net, x, temperature="1")


def test_evaluate_takes_tensors_and_names_a_loader():
    net = SmallNet().eval()
    x, y = _data(n=30)
    cfg = _cfg("ce", val_size=10, temperatures="1", epsilons="0")
    with pytest.raises(ConfidentError, match=r"evaluate: ood_sets\['n'\] is a DataLoader, expected a tensor"):
        confident.evaluate(net, x, y, {"n": DataLoader(TensorDataset(x), batch_size=10)}, cfg, log=_quiet)
    with pytest.raises(ConfidentError, match=r"evaluate: ood_sets\['n'\]: float images with values"):
        confident.evaluate(net, x, y, {"n": x * 255}, cfg, log=_quiet)
    assert "n" in confident.evaluate(net, x, y.int(), {"n": torch.rand(30, 3, 32, 32)}, cfg, log=_quiet)["ood"]
    bad = y.clone()
    bad[0] = 5
    with pytest.raises(ConfidentError, match=r"evaluate: labels y_in in \[0, 5\], expected \[0, 3\)"):
        confident.evaluate(net, x, bad, {"n": torch.rand(30, 3, 32, 32)}, cfg, log=_quiet)
    with pytest.raises(ConfidentError, match=r"evaluate: labels y_in \(30,\)"):
        confident.evaluate(net, x, y > 0, {"n": torch.rand(30, 3, 32, 32)}, cfg, log=_quiet)
