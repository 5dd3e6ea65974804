"""Your own data: Dataset.from_tensors, .npz files, image folders, normalization statistics, and any channel
count and image size through augmentation, models and the generator bank."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import advgen.cli
from advgen.data import Batches, Dataset, crop_padding, load_cifar, load_dataset, normalization_for
from advgen.errors import DataError, UserError
from advgen.models import BankConfig, GeneratorBank, build_model
from advgen.models.normalize import CIFAR100_MEAN, CIFAR100_STD


def npz(path, n=24, size=(28, 28), channels=None, classes=4, **override):
    """An .npz of uint8 N x H x W (x C) images with labels 0..classes-1 cycled; `override` replaces arrays."""
    rng = np.random.default_rng(0)
    shape = (n, *size) + ((channels,) if channels else ())
    arrays = {"x_train": rng.integers(0, 256, shape, dtype=np.uint8), "y_train": np.arange(n) % classes,
              "x_test": rng.integers(0, 256, (8, *shape[1:]), dtype=np.uint8), "y_test": np.arange(8) % classes}
    arrays.update(override)
    np.savez(path, **arrays)
    return path


# ------------------------------------------------------------------------------------------ from_tensors

def test_from_tensors_uint8_and_float_pixels():
    x = torch.randint(0, 256, (5, 2, 6, 7), dtype=torch.uint8)
    ds = Dataset.from_tensors(x, torch.tensor([0, 1, 2, 1, 0]))
    assert torch.equal(ds.images, x) and ds.num_classes == 3 and ds.labels.dtype == torch.int64
    as_float = Dataset.from_tensors(x.double() / 255, np.array([0, 1, 2, 1, 0]), 5)
    assert torch.equal(as_float.images, x) and as_float.num_classes == 5      # exact, not divided again
    gray = Dataset.from_tensors(np.zeros((3, 9, 9), dtype=np.float32), np.zeros(3, dtype=np.int32))
    assert gray.images.shape == (3, 1, 9, 9)


def test_float_pixels_batch_to_the_same_values_not_divided_twice():
    x = torch.rand(8, 3, 8, 8)
    ds = Dataset.from_tensors(x, torch.arange(8) % 2)
    xb, _ = next(Batches(ds, 8, train=False).epoch(0))
    assert (xb - x).abs().max() <= 0.5 / 255 + 1e-6
    with pytest.raises(DataError, match="from_tensors"):    # a float tensor would have been divided by 255 again
        Dataset(x, torch.arange(8) % 2, 2)


@pytest.mark.parametrize("images,labels,needle", [
    (torch.rand(4, 3, 8, 8) * 255, torch.arange(4), "float images must be pixels in [0, 1]; "),
    (torch.full((4, 3, 8, 8), float("nan")), torch.arange(4), "found NaN or inf"),
    (torch.full((4, 3, 8, 8), -0.5), torch.arange(4), "found -0.5..-0.5"),
    (torch.zeros(4, 3, 8, 8, dtype=torch.int64), torch.arange(4), "images have dtype torch.int64"),
    (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0.0, 1.0, 2.0, 3.0]), "labels must be integers"),
    (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.arange(3), "4 images but labels of shape (3,)"),
    (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, -1, 2]), "labels must lie in 0..2"),
    (torch.zeros(4, 8, dtype=torch.uint8), torch.arange(4), "must be (N, C, H, W) or (N, H, W)"),
    (np.array([["a"]] * 4), torch.arange(4), "dtype <U1"),
])
def test_from_tensors_refuses_bad_data_in_one_line(images, labels, needle):
    with pytest.raises(DataError) as e:
        Dataset.from_tensors(images, labels, source="mine")
    assert str(e.value).startswith("mine: ") and needle in str(e.value) and "\n" not in str(e.value)


def test_labels_beyond_num_classes_are_refused():
    with pytest.raises(DataError, match="labels must lie in 0..1, found 0..2"):
        Dataset.from_tensors(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 2]), 2)


# ----------------------------------------------------------------------------------------------- .npz

def test_npz_one_channel_28x28_loads_with_own_stats(tmp_path):
    train, test = load_dataset(str(npz(tmp_path / "d.npz")))
    assert train.images.shape == (24, 1, 28, 28) and test.images.shape == (8, 1, 28, 28)
    assert train.num_classes == test.num_classes == 4
    mean, std = normalization_for(train)
    x = train.images.double() / 255
    assert mean == pytest.approx((x.mean().item(),)) and std == pytest.approx((x.std(unbiased=False).item(),))
    assert normalization_for(test) == (mean, std)                  # the training split's statistics


def test_npz_nhwc_colour_is_transposed(tmp_path):
    path = npz(tmp_path / "c.npz", size=(10, 12), channels=3)
    with np.load(path) as a:
        ref = a["x_train"]
    train, _ = load_dataset(str(path))
    assert train.images.shape == (24, 3, 10, 12)
    assert train.images[5, 2, 3, 4].item() == ref[5, 3, 4, 2]


@pytest.mark.parametrize("override,needle", [
    ({"x_train": np.random.default_rng(1).random((24, 28, 28)) * 255}, "float images must be pixels in [0, 1]"),
    ({"y_train": np.arange(24) % 4 + 0.5}, "labels must be integers"),
    ({"y_train": np.arange(23) % 4}, "24 images but labels of shape (23,)"),
    ({"y_test": np.arange(8) % 5}, "labels must lie in 0..3"),
    ({"y_train": np.arange(24) % 4 * 2}, "3 of 7 classes have no image (1, 3, 5)"),
    ({"x_train": np.zeros((24, 3, 28, 28), np.uint8)}, "looks like N x C x H x W"),
    ({"x_test": np.zeros((8, 14, 14), np.uint8)}, "training images are (1, 28, 28) (C, H, W) but test images (1, 14, 14)"),
    ({"x_train": np.zeros((24, 28, 28), np.int16)}, "images have dtype torch.int16"),
])
def test_bad_npz_is_one_line_naming_file_and_problem(tmp_path, override, needle):
    path = npz(tmp_path / "bad.npz", **override)
    with pytest.raises(DataError) as e:
        load_dataset(str(path))
    assert str(path) in str(e.value) and needle in str(e.value), str(e.value)


def test_npz_missing_keys_pickled_arrays_and_garbage(tmp_path):
    np.savez(tmp_path / "few.npz", x_train=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match="lacks y_train, x_test, y_test"):
        load_dataset(str(tmp_path / "few.npz"))
    np.savez(tmp_path / "obj.npz", x_train=np.array([object()] * 2), y_train=[0, 1], x_test=[0], y_test=[0])
    with pytest.raises(DataError, match="object .pickled. array"):
        load_dataset(str(tmp_path / "obj.npz"))
    (tmp_path / "junk.npz").write_bytes(b"junk" * 10)
    with pytest.raises(DataError, match="is not a readable .npz file"):
        load_dataset(str(tmp_path / "junk.npz"))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "absent.npz"))


# ---------------------------------------------------------------------------------------- image folders

def write_folder(root, mode="L", size=(12, 10), classes=("cat", "dog"), per_class=3):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / split / c / f"{i}.png")
    return root


def test_image_folder_gray_and_colour(tmp_path):
    from PIL import Image
    root = write_folder(tmp_path / "g")
    train, test = load_dataset(str(root))
    assert train.images.shape == (6, 1, 10, 12) and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    ref = np.asarray(Image.open(root / "train" / "dog" / "1.png"))
    assert np.array_equal(train.images[4, 0].numpy(), ref)
    assert normalization_for(test) == normalization_for(train) and len(train.stats[0]) == 1
    rgb = write_folder(tmp_path / "c", mode="RGB")
    Image.fromarray(np.zeros((10, 12), np.uint8), "L").save(rgb / "train" / "cat" / "gray.jpg")  # mixed: all RGB
    train, _ = load_dataset(str(rgb))
    assert train.images.shape == (7, 3, 10, 12)


def test_bad_image_folders(tmp_path):
    root = write_folder(tmp_path / "a")
    (root / "train" / "cat" / "1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"1.png is not a readable image"):
        load_dataset(str(root))
    root = write_folder(tmp_path / "b")
    (root / "train" / "emu").mkdir()
    with pytest.raises(DataError, match=r"emu holds no .png or .jpg image \(an empty class\)"):
        load_dataset(str(root))
    root = write_folder(tmp_path / "c")
    from PIL import Image
    Image.fromarray(np.zeros((5, 5), np.uint8), "L").save(root / "test" / "dog" / "odd.png")
    with pytest.raises(DataError, match="odd.png is 5x5 pixels where .* is 12x10"):
        load_dataset(str(root))
    (tmp_path / "d" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="test/ is missing"):
        load_dataset(str(tmp_path / "d"))


# ------------------------------------------------------------------------- statistics, sizes, channels

def test_cifar_statistics_per_dataset(tmp_path):
    from synth_cifar import write_cifar
    write_cifar(tmp_path)
    train, test = load_cifar("cifar10", tmp_path)
    assert normalization_for(train)[0] == (0.4914, 0.4822, 0.4465)
    import pickle
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 20), ("test", 10)):
        d = {b"data": np.zeros((n, 3072), np.uint8), b"fine_labels": list(range(n))}
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
    train, _ = load_cifar("cifar100", tmp_path)
    assert train.num_classes == 100 and normalization_for(train) == (CIFAR100_MEAN, CIFAR100_STD)
    model = build_model("resnet20", train.num_classes, mean=CIFAR100_MEAN, std=CIFAR100_STD)
    assert model[0].mean.flatten().tolist() == pytest.approx(CIFAR100_MEAN)


@pytest.mark.parametrize("h,w,pad", [(32, 32, 4), (28, 28, 4), (64, 64, 8), (12, 10, 1), (4, 4, 1), (100, 20, 3)])
def test_crop_padding_scales_with_the_image(h, w, pad):
    assert crop_padding(h, w) == pad


def test_one_channel_28x28_through_batches_models_and_bank():
    g = torch.Generator().manual_seed(0)
    ds = Dataset.from_tensors(torch.randint(0, 256, (16, 28, 28), generator=g, dtype=torch.uint8), torch.arange(16) % 4)
    batches = Batches(ds, 8, seed=1)
    x, y = next(batches.epoch(0))
    assert x.shape == (8, 1, 28, 28) and batches.pad == 4
    # crops differ from the originals by whole-pixel shifts of at most pad (or a flip)
    mean, std = normalization_for(ds)
    for name in ("resnet20", "preact_resnet18"):
        model = build_model(name, ds.num_classes, ds.channels, mean=mean, std=std).eval()
        with torch.no_grad():
            assert model(x).shape == (8, 4)
    bank = GeneratorBank(BankConfig(n=4, bound="l2", size=0.5), channels=ds.channels)
    x_adv, k = bank(x)
    assert x_adv.shape == x.shape and float(x_adv.detach().min()) >= 0 and float(x_adv.detach().max()) <= 1
    with pytest.raises(UserError, match="1-channel images need their own normalization"):
        build_model("resnet20", 4, 1)                       # no CIFAR-10 statistics for 1 channel


def test_attack_on_one_channel_model():
    from advgen import PGD
    torch.manual_seed(0)
    model = build_model("resnet20", 3, 1, mean=[0.5], std=[0.25]).eval()
    x, y = torch.rand(4, 1, 20, 20), torch.tensor([0, 1, 2, 0])
    x_adv = PGD(model, norm="l2", eps=0.5, steps=3)(x, y)
    assert x_adv.shape == x.shape and ((x_adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-4).all()


def test_cli_eval_on_an_npz_with_a_foreign_one_channel_file(tmp_path, capsys):
    path = npz(tmp_path / "d.npz", size=(16, 16))
    net = build_model("resnet20", 4, 1, mean=[0.5], std=[0.25])[1]
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, tmp_path / "m.pth")
    argv = ["eval", str(tmp_path / "m.pth"), "--model", "resnet20", "--normalize", "0.5/0.25", "--dataset", str(path),
            "--device", "cpu", "--eps", "0,0.1", "--steps", "1"]
    assert advgen.cli.main(argv) == 0
    assert "8 images" in capsys.readouterr().out
    bad = npz(tmp_path / "bad.npz", y_train=np.arange(24) % 4 + 0.5)
    assert advgen.cli.main(argv[:6] + ["--dataset", str(bad), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "labels must be integers" in err[0]
    assert advgen.cli.main(argv[:6] + ["--dataset", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    assert "unknown dataset" in capsys.readouterr().err


def test_own_module_and_grayscale_npz_train_with_generators_evaluate_and_reload(tmp_path, monkeypatch, capsys):
    """The issue's end-to-end case: a user's nn.Module factory and an .npz of 1x28x28 images train with
    the generator method from the CLI, evaluate from the CLI, and the run reloads by itself."""
    import advgen
    from advgen.cli import main
    (tmp_path / "mynets.py").write_text(
        "from torch import nn\n"
        "def small(num_classes):\n"
        "    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(8, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = np.random.default_rng(0)
    y_train, y_test = np.arange(60) % 3, np.arange(30) % 3
    x_train = (rng.integers(0, 80, (60, 28, 28)) + 80 * y_train[:, None, None]).astype(np.uint8)
    x_test = (rng.integers(0, 80, (30, 28, 28)) + 80 * y_test[:, None, None]).astype(np.uint8)
    data = tmp_path / "digits.npz"
    np.savez(data, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    run = tmp_path / "run"
    assert main(["train", "--method", "generator", "--model", "mynets:small", "--dataset", str(data),
                 "--epochs", "2", "--batch-size", "20", "--generators", "4", "--gen-bound-type", "l2",
                 "--gen-bound", "1.0", "--device", "cpu", "--out", str(run)]) == 0
    assert (run / "generators.safetensors").exists()
    model = advgen.load_model(run)
    assert model(torch.rand(5, 1, 28, 28)).shape == (5, 3)
    mean = model[0].mean.flatten()
    assert mean.shape == (1,) and abs(mean.item() - x_train.mean() / 255) < 1e-3   # the data's own statistics
    capsys.readouterr()
    assert main(["eval", str(run), "--dataset", str(data), "--attack", "pgd-l2", "--eps", "0,1", "--steps", "3",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "30 images; PGD-L2" in out and "accuracy non-increasing in eps" in out
    # a model path that does not import is a one-line error
    assert main(["train", "--method", "standard", "--model", "nowhere.nets:small", "--dataset", str(data),
                 "--out", str(tmp_path / "r2")]) == 2
    assert "cannot import nowhere.nets" in capsys.readouterr().err
    assert main(["train", "--method", "standard", "--model", "os:system", "--dataset", str(data),
                 "--out", str(tmp_path / "r3")]) == 2
    assert "standard library are refused" in capsys.readouterr().err
