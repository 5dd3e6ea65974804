"""CIFAR loading (format, safety, validation), subsets, augmentation and batching."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

import advgen
from advgen.data import Batches, Dataset, augment, balanced_subset, first_n, load_cifar
from advgen.errors import DataError, UserError
from synth_cifar import System, Touch, shown_pixels

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]


def pixel_value(i, c, r, col):
    """The synthetic value of image i, channel c, row r, column col (uint8, distinct per position)."""
    return (i * 37 + c * 101 + r * 7 + col * 3) % 256


def canonical_rows(first: int, n: int) -> np.ndarray:
    """(n, 3072) rows in CIFAR's layout: red plane, green plane, blue plane, each row-major 32x32."""
    flat = np.arange(3072)
    c, r, col = flat // 1024, (flat % 1024) // 32, flat % 32
    return np.stack([pixel_value(first + k, c, r, col) for k in range(n)]).astype(np.uint8)


def write_batch(path, obj, protocol=2):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def batch_dict(first, n, labels=None, name=b"batch"):
    labels = [(first + k) % 10 for k in range(n)] if labels is None else labels
    return {b"batch_label": name, b"labels": labels, b"data": canonical_rows(first, n),
            b"filenames": [b"img_%d.png" % (first + k) for k in range(n)]}


def write_cifar(root, per_batch=4, n_test=6):
    """A tiny CIFAR-10 in the official python-version format under root/cifar-10-batches-py."""
    folder = root / FOLDER
    folder.mkdir(parents=True)
    for b, name in enumerate(TRAIN_FILES):
        write_batch(folder / name, batch_dict(b * per_batch, per_batch, name=name.encode()))
    write_batch(folder / "test_batch", batch_dict(1000, n_test, labels=[9 - k % 10 for k in range(n_test)]))
    write_batch(folder / "batches.meta", {b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer",
                                                           b"dog", b"frog", b"horse", b"ship", b"truck"],
                                          b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    return folder


# ---------------------------------------------------------------------------------------------- loading

def test_load_synthetic_cifar_layout_and_labels(tmp_path):
    write_cifar(tmp_path, per_batch=4, n_test=6)
    train, test = load_cifar("cifar10", tmp_path)
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (6, 3, 32, 32)
    assert train.labels.dtype == torch.int64 and train.num_classes == 10
    # data_batch_1..5 concatenated in order; labels as written
    assert train.labels.tolist() == [i % 10 for i in range(20)]
    assert test.labels.tolist() == [9, 8, 7, 6, 5, 4]
    # pixel (c, r, col) of image i is read from the channel-major, row-major plane layout
    for ds, k, written_as in [(train, 0, 0), (train, 13, 13), (test, 0, 1000), (test, 5, 1005)]:
        img = ds.images[k].numpy().astype(int)
        for c, r, col in [(0, 0, 0), (0, 0, 31), (0, 1, 0), (1, 0, 0), (2, 31, 31), (1, 17, 5)]:
            assert img[c, r, col] == pixel_value(written_as, c, r, col), (k, c, r, col)
    c, r, col = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    np.testing.assert_array_equal(train.images[7].numpy(), pixel_value(7, c, r, col).astype(np.uint8))
    # float images in [0, 1]
    f = test.float_images()
    assert f.dtype == torch.float32 and torch.allclose(f * 255, test.images.float())


def test_load_accepts_the_folder_itself(tmp_path):
    folder = write_cifar(tmp_path)
    train, test = load_cifar("cifar10", folder)
    assert len(train) == 20 and len(test) == 6


def test_load_protocol_4_pickles_too(tmp_path):
    folder = write_cifar(tmp_path)
    write_batch(folder / "data_batch_2", batch_dict(4, 4), protocol=4)
    train, _ = load_cifar("cifar10", tmp_path)
    assert train.labels.tolist() == [i % 10 for i in range(20)]


@pytest.mark.parametrize("evil", [Touch, System])
@pytest.mark.parametrize("where", ["top", "inside"])
def test_malicious_pickle_is_refused_without_side_effect(tmp_path, evil, where):
    folder = write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    obj = evil(marker) if where == "top" else {**batch_dict(0, 4), b"data": evil(marker)}
    write_batch(folder / "data_batch_1", obj)
    with pytest.raises(DataError, match="data_batch_1"):
        load_cifar("cifar10", tmp_path)
    assert not marker.exists()


def test_truncated_file_names_the_file(tmp_path):
    folder = write_cifar(tmp_path)
    raw = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar("cifar10", tmp_path)


def test_empty_and_garbage_files(tmp_path):
    folder = write_cifar(tmp_path)
    (folder / "test_batch").write_bytes(b"")
    with pytest.raises(DataError, match="test_batch"):
        load_cifar("cifar10", tmp_path)
    (folder / "test_batch").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match="test_batch"):
        load_cifar("cifar10", tmp_path)


@pytest.mark.parametrize("change", [
    {b"data": np.zeros((4, 3000), np.uint8)},                  # wrong row length
    {b"data": np.zeros((4, 3, 32, 32), np.uint8)},              # not flat
    {b"data": np.zeros((4, 3072), np.float32)},                 # wrong dtype
    {b"data": [[0] * 3072] * 4},                                # not an array
    {b"labels": [0, 1, 2, 10]},                                 # label out of range
    {b"labels": [0, -1, 2, 3]},                                 # negative label
    {b"labels": [0, 1, 2]},                                     # too few labels
    {b"labels": None},                                          # missing
])
def test_malformed_batch_raises_data_error(tmp_path, change):
    folder = write_cifar(tmp_path)
    write_batch(folder / "data_batch_2", {**batch_dict(4, 4), **change})
    with pytest.raises(DataError, match="data_batch_2"):
        load_cifar("cifar10", tmp_path)


def test_batch_that_is_not_a_dict(tmp_path):
    folder = write_cifar(tmp_path)
    write_batch(folder / "data_batch_5", [1, 2, 3])
    with pytest.raises(DataError, match="data_batch_5"):
        load_cifar("cifar10", tmp_path)


def test_missing_file_raises_data_error(tmp_path):
    folder = write_cifar(tmp_path)
    (folder / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4"):
        load_cifar("cifar10", tmp_path)


def test_missing_folder_without_download(tmp_path):
    with pytest.raises(DataError, match=FOLDER):
        load_cifar("cifar10", tmp_path / "nowhere")
    with pytest.raises(DataError):
        load_cifar("cifar10", tmp_path)


def test_unknown_dataset_is_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown dataset"):
        load_cifar("mnist", tmp_path)


def test_data_error_is_user_error():
    assert issubclass(DataError, UserError)


# ---------------------------------------------------------------------------------------------- subsets

def indexed_dataset(labels) -> Dataset:
    """A Dataset whose image i carries its index in pixels [0,0,0] (high byte) and [0,0,1] (low byte)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    n = labels.shape[0]
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    idx = torch.arange(n)
    images[:, 0, 0, 0] = (idx // 256).to(torch.uint8)
    images[:, 0, 0, 1] = (idx % 256).to(torch.uint8)
    return Dataset(images, labels, 10)


def indices_of(ds: Dataset) -> list[int]:
    return (ds.images[:, 0, 0, 0].long() * 256 + ds.images[:, 0, 0, 1].long()).tolist()


def test_balanced_subset_is_class_balanced():
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(1000) % 10
    ds = indexed_dataset(labels[torch.randperm(1000, generator=g)])
    for n in (100, 95, 10, 7):
        sub = balanced_subset(ds, n, seed=0)
        assert len(sub) == n
        counts = torch.bincount(sub.labels, minlength=10)
        assert counts.max() - counts.min() <= 1, (n, counts)
        idx = indices_of(sub)
        assert len(set(idx)) == n                                 # no image twice
        assert torch.equal(sub.labels, ds.labels[idx])            # images and labels stay paired


def test_balanced_subset_with_a_rare_class():
    labels = [0] * 3 + [c for c in range(1, 10) for _ in range(20)]
    ds = indexed_dataset(labels)
    counts = torch.bincount(balanced_subset(ds, 50, seed=1).labels, minlength=10)
    assert counts[0] == 3                                         # all it has
    assert counts[1:].max() - counts[1:].min() <= 1 and counts.sum() == 50


def test_balanced_subset_is_seeded():
    ds = indexed_dataset(torch.arange(500) % 10)
    a, b, c = (indices_of(balanced_subset(ds, 50, seed=s)) for s in (3, 3, 4))
    assert a == b
    assert a != c


def test_balanced_subset_rejects_bad_sizes():
    ds = indexed_dataset(torch.arange(30) % 10)
    with pytest.raises(UserError):
        balanced_subset(ds, 31, seed=0)
    with pytest.raises(UserError):
        balanced_subset(ds, 0, seed=0)
    assert len(balanced_subset(ds, 30, seed=0)) == 30


def test_first_n():
    ds = indexed_dataset(torch.arange(30) % 10)
    assert indices_of(first_n(ds, 7)) == list(range(7))
    assert torch.equal(first_n(ds, 7).labels, ds.labels[:7])
    assert first_n(ds, None) is ds
    for bad in (0, 31):
        with pytest.raises(UserError):
            first_n(ds, bad)


# ---------------------------------------------------------------------------------------------- augment

def random_uint8(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, 32, 32), generator=g, dtype=torch.uint8)


def find_crop(out, img, pad):
    """The (dy, dx, flipped) with out == crop of the zero-padded img, or None."""
    padded = torch.nn.functional.pad(img, (pad, pad, pad, pad))
    h, w = img.shape[-2:]
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            for flipped, cand in ((False, crop), (True, crop.flip(-1))):
                if torch.equal(out, cand):
                    return dy, dx, flipped
    return None


def test_augment_keeps_shape_and_dtype():
    x = random_uint8(8)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert not torch.equal(out, x)


def test_augment_pad0_is_identity_or_flip():
    x = random_uint8(32)
    out = augment(x, torch.Generator().manual_seed(1), pad=0)
    flips = []
    for i in range(32):
        same, flipped = torch.equal(out[i], x[i]), torch.equal(out[i], x[i].flip(-1))
        assert same or flipped, i
        flips.append(flipped)
    assert any(flips) and not all(flips)


def test_augment_is_a_translated_crop_of_the_padded_image():
    x = random_uint8(24, seed=2)
    out = augment(x, torch.Generator().manual_seed(3), pad=4)
    found = [find_crop(out[i], x[i], 4) for i in range(24)]
    assert all(f is not None for f in found), found
    assert len({(dy, dx) for dy, dx, _ in found}) > 5            # offsets vary over the batch
    assert {f for _, _, f in found} == {False, True}
    # one image against a manual slice, including the zero border
    dy, dx, flipped = found[0]
    manual = torch.zeros(3, 40, 40, dtype=torch.uint8)
    manual[:, 4:36, 4:36] = x[0]
    manual = manual[:, dy:dy + 32, dx:dx + 32]
    assert torch.equal(out[0], manual.flip(-1) if flipped else manual)


def test_augment_is_deterministic_under_a_seeded_generator():
    x = random_uint8(16)
    a = augment(x, torch.Generator().manual_seed(7))
    b = augment(x, torch.Generator().manual_seed(7))
    c = augment(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------- batches

def id_dataset(n):
    """labels = indices, so a batch tells which images it drew."""
    return Dataset(random_uint8(n, seed=9), torch.arange(n), n)


def epoch_ids(batches, epoch):
    return [y.tolist() for _, y in batches.epoch(epoch)]


def test_batches_train_every_index_once_drop_last():
    ds = id_dataset(103)
    bt = Batches(ds, 10, seed=0, train=True)
    assert len(bt) == 10
    got = epoch_ids(bt, 1)
    assert len(got) == 10 and all(len(b) == 10 for b in got)
    flat = [i for b in got for i in b]
    assert len(set(flat)) == 100 and set(flat) <= set(range(103))
    for x, y in bt.epoch(1):
        assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32
        assert 0 <= x.min() and x.max() <= 1


def test_batches_without_drop_last_cover_everything():
    bt = Batches(id_dataset(103), 10, seed=0, train=True, drop_last=False)
    assert len(bt) == 11
    got = epoch_ids(bt, 2)
    assert [len(b) for b in got] == [10] * 10 + [3]
    assert sorted(i for b in got for i in b) == list(range(103))


def test_batches_order_is_seeded_per_epoch():
    ds = id_dataset(60)
    a = Batches(ds, 8, seed=1)
    assert epoch_ids(a, 1) == epoch_ids(Batches(ds, 8, seed=1), 1)
    assert epoch_ids(a, 1) != epoch_ids(a, 2)
    assert epoch_ids(a, 1) != epoch_ids(Batches(ds, 8, seed=2), 1)
    assert epoch_ids(a, 1) != [list(range(i, i + 8)) for i in range(0, 56, 8)]   # shuffled
    # resuming at batch 3 continues the same order
    assert [y.tolist() for _, y in a.epoch(1, start=3)] == epoch_ids(a, 1)[3:]
    # the same (seed, epoch) gives the same augmented pixels
    xa = torch.cat([x for x, _ in a.epoch(4)])
    xb = torch.cat([x for x, _ in Batches(ds, 8, seed=1).epoch(4)])
    assert torch.equal(xa, xb)


def test_batches_eval_in_order_without_augmentation():
    ds = id_dataset(25)
    bt = Batches(ds, 10, train=False)
    assert len(bt) == 3
    xs, ys = zip(*bt.epoch(0))
    assert torch.equal(torch.cat(ys), torch.arange(25))
    assert torch.equal(torch.cat(xs), ds.images.float() / 255)


def test_batches_reject_bad_sizes():
    ds = id_dataset(5)
    with pytest.raises(UserError):
        Batches(ds, 0)
    with pytest.raises(UserError):
        Batches(ds, 6, train=True)
    assert len(Batches(ds, 6, train=False)) == 1


# ---------------------------------------------------------------------------- per-sample state (Where)

def test_where_gather_augments_like_the_batch():
    ds = id_dataset(24)
    bt = Batches(ds, 8, seed=3)
    for x, y, where in bt.epoch(1, where=True):
        assert torch.equal(where.idx, y)                           # id_dataset: labels are the indices
        assert torch.equal(where.gather(ds.images), (x * 255).round().to(torch.uint8))


def test_where_scatter_then_gather_follows_the_pixels_through_other_crops_and_flips():
    """A value stored for a pixel of an augmented image is read back, in the next epoch's other crop and
    flip, on the same image pixel; pixels a crop cut off keep what the store held; padding reads 0."""
    ds = id_dataset(24)
    bt = Batches(ds, 8, seed=3)
    store = torch.full((24, 3, 32, 32), -1.0)
    expect = store.clone()
    seen = {}
    for x, _, where in bt.epoch(1, where=True):
        values = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(where.idx[0])))
        where.scatter_(store, values)
        for b, i in enumerate(where.idx.tolist()):
            aug = (int(where.offs[0, b]), int(where.offs[1, b]), bool(where.flip[b]))
            r, c, inside = shown_pixels(*aug, where.pad)
            expect[i][:, r[inside], c[inside]] = values[b][:, inside]
            seen[i] = aug
    assert torch.equal(store, expect)
    assert (store == -1).any() and (store != -1).float().mean() > 0.5   # some pixels cut off, most written
    moved = 0
    for x, _, where in bt.epoch(2, where=True):
        got = where.gather(store)
        for b, i in enumerate(where.idx.tolist()):
            aug = (int(where.offs[0, b]), int(where.offs[1, b]), bool(where.flip[b]))
            r, c, inside = shown_pixels(*aug, where.pad)
            want = torch.zeros(3, 32, 32)
            want[:, inside] = expect[i][:, r[inside], c[inside]]
            assert torch.equal(got[b], want), i
            moved += aug != seen[i]
    assert moved >= 20                                           # nearly every image got another crop or flip


def test_where_scatter_into_float16_and_unaugmented_batches():
    ds = id_dataset(16)
    store = torch.zeros(16, 3, 32, 32, dtype=torch.float16)
    for x, _, where in Batches(ds, 8, train=False).epoch(0, where=True):
        assert where.offs is None
        where.scatter_(store, x)
        assert torch.equal(where.gather(store), x.half())
        assert torch.equal(where[2:5].idx, where.idx[2:5])
    assert torch.equal(store, (ds.images.float() / 255).half())


# ---------------------------------------------------------------------------------------------- real data

def test_real_cifar10(shared_data):
    train, test = advgen.load_cifar("cifar10", shared_data)
    assert train.images.shape == (50000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    assert train.num_classes == 10
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 5000))
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))
    # the first labels of data_batch_1 (frog, truck, truck, deer) and test_batch (cat, ship, ship, airplane)
    assert train.labels[:4].tolist() == [6, 9, 9, 4]
    assert test.labels[:4].tolist() == [3, 8, 8, 0]
    means = train.images.sum(dim=(0, 2, 3), dtype=torch.int64).double() / (50000 * 1024 * 255)
    assert torch.allclose(means, torch.tensor([0.4913, 0.4821, 0.4465], dtype=torch.double), atol=1e-3), means


def test_augment_chooses_crop_flip_both_or_none():
    """--augment: none gives the images as they are; flip only mirrors, never shifts; crop only shifts,
    never mirrors; crop,flip (the default) draws the same stream as before the option existed."""
    from synth_cifar import tiny_dataset
    ds = tiny_dataset(32, 3)
    raw = ds.images.float() / 255

    def batch(augment):
        b = Batches(ds, 32, seed=1, augment=augment)
        order, _ = b.position(1)
        x, _ = next(iter(b.epoch(1)))
        return x, raw[order[:32]]

    x, ref = batch(())
    assert torch.equal(x, ref)
    x, ref = batch(("flip",))
    same, mirrored = [(x == ref).flatten(1).all(1), (x == ref.flip(3)).flatten(1).all(1)]
    assert (same | mirrored).all() and mirrored.any() and same.any()
    x, ref = batch(("crop",))
    assert not (x == ref.flip(3)).flatten(1).all(1)[~(x == ref).flatten(1).all(1)].any()
    assert not (x == ref).flatten(1).all(1).all()                  # some rows shifted
    assert torch.equal(batch(("crop", "flip"))[0], next(iter(Batches(ds, 32, seed=1).epoch(1)))[0])
    with pytest.raises(UserError, match="unknown augmentation rotate"):
        Batches(ds, 32, augment=("rotate",))


def test_augment_flag_is_recorded_and_checked(tmp_path, capsys):
    from advgen.cli import main
    from synth_cifar import write_cifar
    data = write_cifar(tmp_path / "data", per_batch=16, n_test=16)
    assert main(["train", "--method", "standard", "--augment", "none", "--epochs", "1", "--batch-size", "16",
                 "--data-dir", str(data), "--device", "cpu", "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "run.json").read_text())["config"]["augment"] == "none"
    assert main(["train", "--method", "standard", "--augment", "crop,rotate", "--out", str(tmp_path / "x")]) == 2
    assert "--augment must be none or a comma list of crop, flip" in capsys.readouterr().err
