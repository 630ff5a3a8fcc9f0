"""Tests for collafuse_mpi.data: loaders, errors, partitions, client splits, batches."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from collafuse_mpi.config import Config, DataConfig
from collafuse_mpi.data import (Batches, DataError, client_data, count_images, load_images, split_aux,
                                partition)


def cfg_for(**data):
    cfg = Config()
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def entropy(labels):
    p = np.bincount(labels) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


# ---------------------------------------------------------------- built-in datasets

def test_digits_shape_range_labels():
    x, y = load_images(DataConfig(dataset="digits", image_size=16, channels=1))
    assert x.shape == (1797, 1, 16, 16) and x.dtype == np.float32
    assert x.min() == -1.0 and x.max() == 1.0
    assert y.dtype == np.int64 and set(y.tolist()) == set(range(10))
    assert count_images(DataConfig(dataset="digits")) == 1797


def test_digits_native_size_matches_sklearn_and_rgb_replicates():
    from sklearn.datasets import load_digits
    x, _ = load_images(DataConfig(dataset="digits", image_size=8, channels=1))
    np.testing.assert_allclose(x[:, 0], load_digits().images / 8.0 - 1.0, atol=1e-6)
    x3, _ = load_images(DataConfig(dataset="digits", image_size=8, channels=3))
    assert x3.shape == (1797, 3, 8, 8)
    assert np.array_equal(x3[:, 0], x3[:, 2]) and np.array_equal(x3[:, 0], x[:, 0])


def test_digits_are_read_as_load_digits_reads_them_without_importing_sklearn():
    """The data file itself, byte for byte the loader's numbers; scikit-learn stays unimported."""
    from sklearn.datasets import load_digits

    from collafuse_mpi.datasets import digits_table
    from conftest import imported_after
    images, labels = digits_table()
    d = load_digits()
    assert np.array_equal(images, d.images) and np.array_equal(labels, d.target)
    code = ("from collafuse_mpi.data import load_images; from collafuse_mpi.config import DataConfig; "
            "load_images(DataConfig(dataset='digits'))")
    assert not imported_after(code, "sklearn")


def test_shapes_deterministic_and_labelled():
    c = DataConfig(dataset="shapes", image_size=16, channels=1)
    x1, y1 = load_images(c)
    x2, y2 = load_images(c)
    assert x1.shape == (2000, 1, 16, 16)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert set(y1.tolist()) == set(range(5))
    assert x1.min() >= -1.0 and x1.max() <= 1.0 and x1.max() > 0.5
    # each image has a shape on a -1 background: neither blank nor full
    frac = (x1 > -0.99).mean(axis=(1, 2, 3))
    assert frac.min() > 0.01 and frac.max() < 0.9
    rgb, _ = load_images(DataConfig(dataset="shapes", image_size=16, channels=3))
    assert rgb.shape == (2000, 3, 16, 16) and not np.array_equal(rgb[:, 0], rgb[:, 1])


def test_max_images_is_fixed_subset():
    full, yfull = load_images(DataConfig(dataset="shapes"))
    sub, ysub = load_images(DataConfig(dataset="shapes", max_images=50))
    assert sub.shape[0] == 50 and count_images(DataConfig(dataset="shapes", max_images=50)) == 50
    # every kept image is one of the full set, and not simply the first 50
    rows = [int(np.nonzero((full == s).all(axis=(1, 2, 3)))[0][0]) for s in sub]
    assert rows == sorted(rows) and rows != list(range(50))
    assert np.array_equal(yfull[rows], ysub)
    again, _ = load_images(DataConfig(dataset="shapes", max_images=50))
    assert np.array_equal(sub, again)


# ---------------------------------------------------------------- npz (MedMNIST layout)

def make_medmnist(path, rgb=False, sizes=(30, 10, 12), side=28, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes):
        shape = (n, side, side, 3) if rgb else (n, side, side)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 4, (n, 1))
    np.savez_compressed(path, **arrays)
    return arrays


def test_npz_grayscale_medmnist(tmp_path):
    path = tmp_path / "gray.npz"
    arrs = make_medmnist(path)
    c = DataConfig(dataset="npz", path=str(path), image_size=28, channels=1)
    x, y = load_images(c)
    assert x.shape == (52, 1, 28, 28)
    expect = np.concatenate([arrs[f"{s}_images"] for s in ("train", "val", "test")])
    np.testing.assert_allclose(x[:, 0], expect / 127.5 - 1.0, atol=1e-6)
    splits = ("train", "val", "test")
    assert np.array_equal(y, np.concatenate([arrs[f"{s}_labels"][:, 0] for s in splits]))
    assert count_images(c) == 52
    small, _ = load_images(DataConfig(dataset="npz", path=str(path), image_size=16, channels=3))
    assert small.shape == (52, 3, 16, 16) and np.array_equal(small[:, 0], small[:, 1])


def test_npz_rgb_to_gray_and_plain_pair(tmp_path):
    path = tmp_path / "rgb.npz"
    make_medmnist(path, rgb=True, sizes=(4, 2, 2), side=16)
    x, _ = load_images(DataConfig(dataset="npz", path=str(path), image_size=16, channels=3))
    assert x.shape == (8, 3, 16, 16)
    red = np.zeros((3, 8, 8, 3), np.uint8)
    red[..., 0] = 255
    plain = tmp_path / "plain.npz"
    np.savez(plain, images=red, labels=np.array([0, 1, 2]))
    g, y = load_images(DataConfig(dataset="npz", path=str(plain), image_size=8, channels=1))
    assert g.shape == (3, 1, 8, 8) and y.tolist() == [0, 1, 2]
    # luma of pure red: 0.299 * 255 = 76
    np.testing.assert_allclose(g, 76 / 127.5 - 1.0, atol=1e-6)


def test_npz_multilabel_and_missing_labels_are_unlabelled(tmp_path):
    path = tmp_path / "chest.npz"
    np.savez(path, train_images=np.zeros((5, 8, 8), np.uint8), train_labels=np.ones((5, 14)),
             test_images=np.zeros((3, 8, 8), np.uint8))
    x, y = load_images(DataConfig(dataset="npz", path=str(path), image_size=8))
    assert x.shape == (8, 1, 8, 8) and (y == -1).all()


def test_npz_float_and_single_channel_arrays(tmp_path):
    path = tmp_path / "float.npz"
    imgs = np.zeros((2, 4, 4, 1), np.float32)
    imgs[1] = 1.0  # floats in [0, 1] are scaled to 0..255
    np.savez(path, images=imgs, labels=np.array([[3], [4]]))
    x, y = load_images(DataConfig(dataset="npz", path=str(path), image_size=4))
    assert y.tolist() == [3, 4]
    assert (x[0] == -1).all() and (x[1] == 1).all()


# ---------------------------------------------------------------- image folders

def test_folder_subfolders_give_labels(tmp_path):
    root = tmp_path / "imgs"
    for cls, value in (("zebra", 200), ("ant", 50)):
        (root / cls / "deep").mkdir(parents=True)
        Image.new("L", (20, 20), value).save(root / cls / "a.png")
        Image.new("RGB", (40, 30), (value,) * 3).save(root / cls / "b.jpg")
        Image.new("RGBA", (12, 12), (value,) * 4).save(root / cls / "deep" / "c.PNG")
    (root / "notes.txt").write_text("not an image")
    c = DataConfig(dataset="folder", path=str(root), image_size=8, channels=1)
    x, y = load_images(c)
    assert x.shape == (6, 1, 8, 8) and count_images(c) == 6
    # sorted folder names: ant -> 0, zebra -> 1; nested folder belongs to its top sub-folder
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    means = {lab: x[y == lab].mean() for lab in (0, 1)}
    assert means[0] == pytest.approx(50 / 127.5 - 1, abs=0.02)
    assert means[1] == pytest.approx(200 / 127.5 - 1, abs=0.02)
    rgb, _ = load_images(DataConfig(dataset="folder", path=str(root), image_size=8, channels=3))
    assert rgb.shape == (6, 3, 8, 8)


def test_folder_flat_is_unlabelled_and_16bit_is_scaled(tmp_path):
    ramp = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 200).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "slice.png")  # 16-bit grayscale, as MRI slices often are
    x, y = load_images(DataConfig(dataset="folder", path=str(tmp_path), image_size=16, channels=1))
    assert y.tolist() == [-1]
    assert x.min() == -1.0 and x.max() == 1.0


# ---------------------------------------------------------------- errors

def test_corrupt_npz(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="junk.npz"):
        load_images(DataConfig(dataset="npz", path=str(path)))
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.npz"):
        count_images(DataConfig(dataset="npz", path=str(empty)))


def test_npz_missing_keys(tmp_path):
    path = tmp_path / "odd.npz"
    np.savez(path, pixels=np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(DataError, match="train_images.*found: pixels"):
        load_images(DataConfig(dataset="npz", path=str(path)))
    bad = tmp_path / "mismatch.npz"
    np.savez(bad, train_images=np.zeros((3, 8, 8), np.uint8), train_labels=np.zeros(4))
    with pytest.raises(DataError, match="train_labels"):
        load_images(DataConfig(dataset="npz", path=str(bad)))


def test_empty_and_missing_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no .png"):
        load_images(DataConfig(dataset="folder", path=str(tmp_path)))
    with pytest.raises(DataError, match="does not exist"):
        load_images(DataConfig(dataset="folder", path=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="does not exist"):
        count_images(DataConfig(dataset="npz", path=str(tmp_path / "nope.npz")))


def test_corrupt_image_is_named(tmp_path):
    Image.new("L", (8, 8), 10).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    c = DataConfig(dataset="folder", path=str(tmp_path), image_size=8)
    assert count_images(c) == 2  # counting does not decode
    with pytest.raises(DataError, match="bad.png"):
        load_images(c)


# ---------------------------------------------------------------- partitions

def check_cover(parts, n):
    flat = np.concatenate(parts)
    assert len(flat) == n and np.array_equal(np.sort(flat), np.arange(n))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_disjoint_covering_deterministic(scheme):
    labels = np.repeat(np.arange(10), 50)
    parts = partition(labels, 4, scheme, 0.5, seed=3)
    check_cover(parts, 500)
    again = partition(labels, 4, scheme, 0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(labels, 4, scheme, 0.5, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_sizes_balanced():
    parts = partition(np.zeros(103, np.int64), 7, "iid", 0.5, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 103


def test_dirichlet_small_alpha_is_skewed_but_every_client_has_minimum():
    _, labels = load_images(DataConfig(dataset="digits", image_size=8))
    for seed in range(3):
        iid = partition(labels, 5, "iid", 0.1, seed)
        non = partition(labels, 5, "dirichlet", 0.1, seed)
        check_cover(non, len(labels))
        h_non = np.mean([entropy(labels[p]) for p in non])
        h_iid = np.mean([entropy(labels[p]) for p in iid])
        assert h_non < 0.7 * h_iid
        assert min(len(p) for p in non) >= 2
    # extreme skew with many clients still leaves every client two images
    tiny = partition(labels[:100], 40, "dirichlet", 0.01, seed=0)
    check_cover(tiny, 100)
    assert min(len(p) for p in tiny) >= 2


def test_dirichlet_without_labels_falls_back_to_iid():
    a = partition(np.full(50, -1), 3, "dirichlet", 0.1, seed=1)
    b = partition(np.full(50, -1), 3, "iid", 0.1, seed=1)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))


def test_too_few_images():
    with pytest.raises(DataError, match="too few"):
        partition(np.zeros(5), 3, "iid", 0.5, seed=0)
    with pytest.raises(DataError, match="too few"):
        client_data(cfg_for(dataset="shapes", max_images=7), 0, 4)


# ---------------------------------------------------------------- client data

def test_client_data_split_and_reproducible():
    cfg = cfg_for(dataset="digits", image_size=8, holdout=0.2, partition="dirichlet", alpha=0.3)
    n_clients = 3
    data = [client_data(cfg, c, n_clients) for c in range(n_clients)]
    all_idx = []
    for d in data:
        assert not set(d.train_index) & set(d.heldout_index)
        m = len(d.train_index) + len(d.heldout_index)
        assert len(d.heldout_index) == max(1, round(0.2 * m))
        assert d.train.shape == (len(d.train_index), 1, 8, 8)
        assert len(d.train_labels) == len(d.train)
        assert d.heldout.shape[0] == len(d.heldout_labels) == len(d.heldout_index)
        all_idx += list(d.train_index) + list(d.heldout_index)
    aux, private = split_aux(1797, cfg.privacy.aux_fraction, cfg.run.seed)
    assert len(aux) == int(0.1 * 1797) and not set(aux) & set(all_idx)  # the public share is nobody's
    assert sorted(all_idx) == list(private)  # clients disjoint and covering the rest
    x, y = load_images(cfg.data)
    assert np.array_equal(data[1].train, x[data[1].train_index])
    assert np.array_equal(data[1].heldout_labels, y[data[1].heldout_index])
    again = client_data(cfg, 1, n_clients)
    assert np.array_equal(again.train, data[1].train)
    assert np.array_equal(again.heldout, data[1].heldout)
    cfg.run.seed = 1
    assert not np.array_equal(client_data(cfg, 1, n_clients).heldout_index, data[1].heldout_index)


def test_client_data_tiny_partition_keeps_one_each_side():
    cfg = cfg_for(dataset="shapes", max_images=8, holdout=0.9)
    d = client_data(cfg, 3, 4)
    assert len(d.train) == 1 and len(d.heldout) == 1
    with pytest.raises(DataError):
        client_data(cfg, 4, 4)


# ---------------------------------------------------------------- batches

def first_ids(batches):
    return [t[:, 0, 0, 0].tolist() for t in batches]


def test_batches_shape_determinism_epoch_cover():
    images = np.broadcast_to(np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1), (10, 1, 2, 2))
    b1, b2 = Batches(images, 4, seed=5), Batches(images, 4, seed=5)
    first = [next(b1) for _ in range(6)]
    assert all(t.shape == (4, 1, 2, 2) and t.dtype == torch.float32 for t in first)
    assert all(torch.equal(a, next(b2)) for a in first)
    ids = [int(v) for t in first for v in t[:, 0, 0, 0]]
    assert sorted(ids[:10]) == list(range(10))  # first epoch: every image exactly once
    assert sorted(ids[10:20]) == list(range(10))  # and the second
    # no batch repeats an image, also where one epoch's leftovers meet the next epoch
    many = [next(b1)[:, 0, 0, 0].tolist() for _ in range(100)]
    assert all(len(set(batch)) == 4 for batch in first_ids(first) + many)
    flat = [int(v) for batch in first_ids(first) + many for v in batch]
    assert all(sorted(flat[i:i + 10]) == list(range(10)) for i in range(0, 400, 10))  # every epoch
    other = Batches(images, 4, seed=6)
    assert not all(torch.equal(a, next(other)) for a in first)


def test_batches_small_set_and_errors():
    images = np.zeros((3, 1, 4, 4), np.float32)
    assert next(Batches(images, 32, seed=0)).shape == (3, 1, 4, 4)
    with pytest.raises(DataError):
        Batches(images[:0], 4, seed=0)


# ---------------------------------------------------------------- pixel values that cannot be images

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_npz_non_finite_pixel_is_refused_naming_file_key_and_index(tmp_path, bad):
    imgs = np.full((5, 4, 4), 0.5, np.float32)
    imgs[3, 1, 2] = bad
    path = tmp_path / "f.npz"
    np.savez(path, train_images=imgs, train_labels=np.zeros(5))
    with pytest.raises(DataError, match=rf"f\.npz: train_images has a non-finite value \({bad}\) at image 3, "
                                        r"pixel \(1, 2\)"):
        load_images(DataConfig(dataset="npz", path=str(path), image_size=4))


def test_npz_float_outlier_is_refused_not_used_to_rescale(tmp_path):
    """Floats in [0, 1] with one value 7.5: min-max scaling by it would put every other pixel near
    black. Refused, naming the first value outside [0, 1]."""
    imgs = np.random.default_rng(0).uniform(0, 1, (6, 4, 4)).astype(np.float32)
    imgs[4, 0, 3] = 7.5
    path = tmp_path / "o.npz"
    np.savez(path, images=imgs)
    with pytest.raises(DataError, match=r"o\.npz: images has float values outside \[0, 1\]: 7\.5 at image 4, "
                                        r"pixel \(0, 3\)"):
        load_images(DataConfig(dataset="npz", path=str(path), image_size=4))


def test_npz_whole_number_floats_in_0_255_are_kept(tmp_path):
    imgs = np.array([[[0, 17], [128, 255]]], np.float64)
    path = tmp_path / "w.npz"
    np.savez(path, images=imgs)
    x, _ = load_images(DataConfig(dataset="npz", path=str(path), image_size=2))
    np.testing.assert_allclose(x[0, 0], imgs[0] / 127.5 - 1.0, atol=1e-6)


def test_npz_16bit_scaling_is_the_same_for_every_client(tmp_path):
    """Min-max scaling of 16-bit data uses the whole split, not the images one client fetched:
    image i converts to the same pixels whoever loads it."""
    from collafuse_mpi.data import _source
    imgs = np.arange(6 * 4 * 4, dtype=np.uint16).reshape(6, 4, 4) * 600
    path = tmp_path / "u16.npz"
    np.savez(path, images=imgs)
    cfg = DataConfig(dataset="npz", path=str(path), image_size=4)
    whole = load_images(cfg)[0]
    _, fetch = _source(cfg)
    np.testing.assert_array_equal(fetch([1, 2]), whole[[1, 2]])
    assert whole.min() == -1.0 and whole.max() == 1.0


def test_npz_string_labels_are_refused_naming_file_and_key(tmp_path):
    path = tmp_path / "s.npz"
    np.savez(path, train_images=np.zeros((3, 4, 4), np.uint8), train_labels=np.array(["cat", "dog", "cat"]))
    with pytest.raises(DataError, match=r"s\.npz: train_labels holds <U3 values, not integer class ids"):
        count_images(DataConfig(dataset="npz", path=str(path), image_size=4))


def test_npz_fractional_float_labels_are_refused(tmp_path):
    path = tmp_path / "l.npz"
    np.savez(path, images=np.zeros((2, 4, 4), np.uint8), labels=np.array([0.5, np.nan]))
    with pytest.raises(DataError, match=r"l\.npz: labels holds float values that are not whole numbers"):
        count_images(DataConfig(dataset="npz", path=str(path), image_size=4))
