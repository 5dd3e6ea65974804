"""Normalization of foreign checkpoints is asked, never assumed (#29 item 2): a file that does not carry
its normalization is refused unless the caller states it (--normalize / normalize=); a file that carries
it (RobustBench mu/sigma, a normalize wrapper's keys) uses it; advgen's own files keep theirs."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from settled import settled
from synth_cifar import write_cifar
from test_foreign_layouts import AkaResNet
from torch import nn

import advgen
from advgen.evaluation import robust_accuracy
from advgen.cli import main
from advgen.training import TrainConfig
from advgen.data import load_cifar
from advgen.errors import ConfigError, UserError
from advgen.models import Normalize, build_model
from advgen.models.normalize import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD

X = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(9))


def logits(model, x=X):
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def aka():
    return settled(AkaResNet(3), seed=21)


@pytest.fixture
def plain_file(tmp_path, aka):
    """A plain torch.save(state_dict) of an akamaster-layout ResNet-20: no normalization inside."""
    torch.save(aka.state_dict(), tmp_path / "plain.pt")
    return tmp_path / "plain.pt"


def test_a_file_without_normalization_is_refused_unless_stated(plain_file, aka):
    with pytest.raises(UserError) as e:
        advgen.load_model(plain_file, model_name="resnet20")
    msg = str(e.value)
    assert "\n" not in msg and "does not carry its normalization" in msg
    assert "--normalize" in msg and "normalize=" in msg
    stats = ((0.1, 0.2, 0.3), (0.3, 0.2, 0.1))           # the API's (mean, std) form still works
    assert torch.equal(logits(advgen.load_model(plain_file, model_name="resnet20", normalize=stats)),
                       logits(nn.Sequential(Normalize(*stats), aka)))


@pytest.mark.parametrize("stated,stats", [
    ("cifar10", (CIFAR10_MEAN, CIFAR10_STD)), ("cifar100", (CIFAR100_MEAN, CIFAR100_STD)),
    ("imagenet", (IMAGENET_MEAN, IMAGENET_STD)), ("none", ((0.0,) * 3, (1.0,) * 3)),
    ("0.5,0.4,0.3/0.2,0.25,0.3", ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)))])
def test_each_stated_form_is_what_goes_in_front(plain_file, aka, stated, stats):
    loaded = advgen.load_model(plain_file, model_name="resnet20", normalize=stated)
    assert torch.allclose(loaded[0].mean.flatten(), torch.tensor(stats[0]))
    assert torch.allclose(loaded[0].std.flatten(), torch.tensor(stats[1]))
    assert torch.equal(logits(loaded), logits(nn.Sequential(Normalize(*stats), aka)))


def test_a_normalize_wrapper_file_carries_its_own(tmp_path, aka):
    """RobustBench's normalize_model(model, mean, std): keys normalize.mean/std and model.*; under module. too."""
    stats = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    wrapped = nn.Sequential()
    wrapped.add_module("normalize", Normalize(*stats))
    wrapped.add_module("model", aka)
    sd = {"module." + k: v for k, v in wrapped.state_dict().items()}
    assert "module.normalize.mean" in sd and "module.model.conv1.weight" in sd
    torch.save({"model_state_dict": sd}, tmp_path / "wrapped.pth")
    loaded = advgen.load_model(tmp_path / "wrapped.pth", model_name="resnet20")
    assert torch.equal(logits(loaded), logits(wrapped))
    assert advgen.load_model(tmp_path / "wrapped.pth", model_name="resnet20", normalize="0.5/0.25") is not None
    with pytest.raises(UserError, match="carries its own normalization .* leave --normalize"):
        advgen.load_model(tmp_path / "wrapped.pth", model_name="resnet20", normalize="cifar10")


def test_half_a_normalization_pair_is_refused(tmp_path, aka):
    sd = {**aka.state_dict(), "mu": torch.zeros(1, 3, 1, 1)}
    torch.save(sd, tmp_path / "half.pt")
    with pytest.raises(advgen.errors.CheckpointError, match="not one whole"):
        advgen.load_model(tmp_path / "half.pt", model_name="resnet20", normalize="none")


def test_advgen_files_keep_theirs_and_refuse_a_contradiction(tmp_path):
    model = build_model("resnet20", mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    path = tmp_path / "own.safetensors"
    advgen.checkpoint.save_model(path, model, {"model": "resnet20", "num_classes": 10})
    assert torch.equal(logits(advgen.load_model(path)), logits(model))
    assert torch.equal(logits(advgen.load_model(path, normalize="0.5/0.2")), logits(model))
    with pytest.raises(UserError, match="carries its own normalization"):
        advgen.load_model(path, normalize="cifar10")


def test_cli_eval_refuses_before_loading_the_data(plain_file, tmp_path, capsys):
    code = main(["eval", str(plain_file), "--model", "resnet20", "--data-dir", str(tmp_path / "no-data"),
                 "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("advgen: error: ") and "--normalize" in err[0] and "does not carry" in err[0]


def _raw_pixel_net(data_dir):
    """An akamaster ResNet-20 that takes bare [0, 1] pixels, its linear bias centred on the synthetic test
    images' features (so that its predictions vary from image to image), and those images relabelled with
    its predictions; -> (net, x uint8, y)."""
    net = settled(AkaResNet(3), seed=22)
    test = load_cifar("cifar10", data_dir)[1]
    x = test.images.float() / 255
    with torch.no_grad():
        feats = net.layer3(net.layer2(net.layer1(torch.relu(net.bn1(net.conv1(x)))))).mean((2, 3))
        net.linear.bias.copy_(-(net.linear.weight @ feats.mean(0)))
        y = net(x).argmax(1)
    assert len(set(y.tolist())) >= 3
    path = data_dir / "cifar-10-batches-py" / "test_batch"
    d = pickle.loads(path.read_bytes())
    d[b"labels"] = [int(v) for v in y]
    path.write_bytes(pickle.dumps(d, protocol=4))
    return net, test.images, y


def test_cli_eval_numbers_of_a_raw_pixel_model(tmp_path, capsys):
    """A model trained on bare [0, 1] pixels, labels = its own predictions: with --normalize none its clean
    accuracy is 100% and its robust accuracy that of the reference net attacked directly; the old CIFAR-10
    default would have scored it lower."""
    data = write_cifar(tmp_path / "data", per_batch=8, n_test=40)
    net, x, y = _raw_pixel_net(data)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "raw.th")
    argv = ["eval", str(tmp_path / "raw.th"), "--model", "resnet20", "--data-dir", str(data), "--device", "cpu",
            "--eps", "0,0.1", "--steps", "3", "--restarts", "1", "--out", str(tmp_path / "r.json")]
    assert main(argv) == 2                             # no statement: refused, not scored as CIFAR-10-normalized
    assert "--normalize" in capsys.readouterr().err
    assert main(argv + ["--normalize", "none"]) == 0
    got = {float(e): r["accuracy"] for e, r in json.loads((tmp_path / "r.json").read_text())["pgd_l2"].items()}
    assert got[0.0] == 1.0
    direct = robust_accuracy(net, x.float() / 255, y, lambda e: advgen.PGD(net, norm="l2", eps=e, steps=3, seed=0),
                             [0.1])[0]
    assert 0.5 < direct < 1.0                                             # the attack bites, not everywhere
    assert abs(got[0.1] - direct) <= 1 / 40                               # at most one image of float rounding
    with torch.no_grad():
        assumed = (net(Normalize()(x.float() / 255)).argmax(1) == y).float().mean().item()
    assert assumed < 0.6                               # what assuming CIFAR-10's statistics would have reported


def test_cli_train_init_from_a_foreign_file_needs_normalize(tmp_path, plain_file, capsys):
    data = write_cifar(tmp_path / "data", per_batch=8, n_test=8)
    argv = ["train", "--method", "standard", "--model", "resnet20", "--init", str(plain_file), "--epochs", "1",
            "--batch-size", "8", "--train-subset", "8", "--data-dir", str(data), "--device", "cpu"]
    assert main(argv + ["--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--normalize" in err[0] and "does not carry its normalization" in err[0]
    assert main(argv + ["--out", str(tmp_path / "run"), "--normalize", "none"]) == 0
    model = advgen.load_model(tmp_path / "run")
    assert torch.equal(model[0].mean.flatten(), torch.zeros(3)) and torch.equal(model[0].std.flatten(), torch.ones(3))
    cfg = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert cfg["init_normalize"] == "none"


def test_init_normalize_without_init_is_a_config_error():
    with pytest.raises(ConfigError, match="init_normalize"):
        TrainConfig(init_normalize="cifar10").validate()
