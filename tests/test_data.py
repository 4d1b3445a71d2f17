"""fastl2r.data: downloads, parsers, task splits and the batch sampler.

Archives are built by the tests in the official formats and served from
127.0.0.1 through $FASTL2R_MIRROR, so the real download, verification and
parsing code runs; parsed tensors are checked against the formulas the tiny
archives were built from.
"""
from __future__ import annotations

import gzip
import math
import shutil
import socket
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from datafixtures import (GRAY, build_cifar10, build_cifar100, build_tiny_imagenet, cifar_pixel, idx_gz,
                          remote_matching, serve)

from fastl2r.data import (FILES, MIRROR_ENV, ImageDataset, Task, TaskSampler, channel_stats, load_dataset,
                          make_task, resolve_data_root, to_float, transform_dataset)
from fastl2r.data import loaders
from fastl2r.errors import UserError

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture(autouse=True)
def no_mirror(monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)


def publish(monkeypatch, archive: Path) -> None:
    """Make the table expect the tiny archive's size and md5."""
    monkeypatch.setitem(FILES, archive.name, remote_matching(archive))


# --- CIFAR ---------------------------------------------------------------------------------------

def test_cifar10_is_downloaded_verified_extracted_parsed_and_cached(tmp_path, monkeypatch):
    tiny = build_cifar10(tmp_path / "src")
    publish(monkeypatch, tiny.archive)
    root = tmp_path / "root"
    with serve(tmp_path / "src") as server:
        monkeypatch.setenv(MIRROR_ENV, server.url + "/")
        data = load_dataset("cifar10", root, progress=False)
        assert server.requests == ["/cifar-10-python.tar.gz"]

        assert data.name == "cifar10" and data.flip and data.channels == 3 and data.num_classes == 10
        assert data.train_images.shape == (15, 3, 32, 32) and data.test_images.shape == (7, 3, 32, 32)
        assert data.train_images.dtype == torch.uint8 and data.train_images.is_contiguous()
        assert data.train_labels.dtype == torch.int64
        assert data.train_labels.tolist() == tiny.train_labels
        assert data.test_labels.tolist() == tiny.test_labels
        assert data.classes == tuple(tiny.classes)
        for i, c, y, x in [(0, 0, 0, 0), (4, 2, 31, 5), (14, 1, 7, 30)]:   # across data_batch_1, 2 and 5
            assert data.train_images[i, c, y, x] == cifar_pixel(i, c, y, x)
        assert data.test_images[6, 2, 10, 20] == cifar_pixel(6, 2, 10, 20)
        pixels = np.array([[cifar_pixel(i, c, y, x) for i in range(15) for y in range(32) for x in range(32)]
                           for c in range(3)]) / 255.0
        np.testing.assert_allclose(data.mean, pixels.mean(axis=1), rtol=1e-6)
        np.testing.assert_allclose(data.std, pixels.std(axis=1), rtol=1e-6)
        assert "cifar10.pt" in files_under(root) and (root / "cifar-10-batches-py" / "test_batch").is_file()
        assert not [f for f in files_under(root) if f.endswith(".tmp") or f.startswith(".")]

        # The cache alone is enough: no archive, no extracted folder, no request.
        (root / "cifar-10-python.tar.gz").unlink()
        shutil.rmtree(root / "cifar-10-batches-py")
        again = load_dataset("cifar10", root, progress=False)
        assert len(server.requests) == 1
    assert torch.equal(again.train_images, data.train_images) and again.classes == data.classes


def test_cifar100_uses_fine_labels_and_names(tmp_path, monkeypatch):
    tiny = build_cifar100(tmp_path / "src")
    publish(monkeypatch, tiny.archive)
    root = tmp_path / "root"
    with serve(tmp_path / "src") as server:
        monkeypatch.setenv(MIRROR_ENV, server.url)
        data = load_dataset("cifar100", root, progress=False)
        assert load_dataset("cifar100", root, progress=False).train_labels.tolist() == tiny.train_labels
        assert len(server.requests) == 1
    assert data.train_images.shape == (11, 3, 32, 32) and data.test_images.shape == (5, 3, 32, 32)
    assert data.train_labels.tolist() == tiny.train_labels and data.test_labels.tolist() == tiny.test_labels
    assert data.num_classes == 100 and data.classes[37] == "fine_37"
    assert data.test_images[4, 1, 3, 9] == cifar_pixel(4, 1, 3, 9)


# --- Tiny-ImageNet -------------------------------------------------------------------------------

def test_tiny_imagenet_zip_is_decoded_resized_and_cached(tmp_path, monkeypatch):
    tiny = build_tiny_imagenet(tmp_path / "src")
    publish(monkeypatch, tiny.archive)
    root = tmp_path / "root"
    with serve(tmp_path / "src") as server:
        monkeypatch.setenv(MIRROR_ENV, server.url)
        data = load_dataset("tiny_imagenet", root, progress=False)
        (root / "tiny-imagenet-200.zip").unlink()
        assert torch.equal(load_dataset("tiny_imagenet", root, progress=False).test_images, data.test_images)
        assert len(server.requests) == 1

    assert data.train_images.shape == (9, 3, 32, 32) and data.test_images.shape == (4, 3, 32, 32)
    assert data.classes == tuple(tiny.names) and data.flip
    assert data.train_labels.tolist() == tiny.train_labels and data.test_labels.tolist() == tiny.test_labels
    images = data.train_images.to(torch.int64)
    for i, color in enumerate(tiny.train_colors):
        if color is not None:   # solid colours survive JPEG and the 64→32 area resize
            assert (images[i] - torch.tensor(color)[:, None, None]).abs().max() <= 6, i
    for j, color in enumerate(tiny.test_colors):
        assert (data.test_images[j].to(torch.int64) - torch.tensor(color)[:, None, None]).abs().max() <= 6, j
    gray = images[tiny.gray_index]      # a grayscale JPEG becomes three equal channels
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert (gray - GRAY).abs().max() <= 3
    half = images[tiny.half_index]      # left 32 of 64 columns white -> left 16 of 32
    assert half[:, :, :14].min() >= 245 and half[:, :, 18:].max() <= 10


# --- verification and failures -------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["wrong md5", "truncated file", "connection cut"])
def test_bad_download_is_rejected_and_leaves_nothing(tmp_path, monkeypatch, fault):
    tiny = build_cifar10(tmp_path / "src")
    good = remote_matching(tiny.archive)
    monkeypatch.setitem(FILES, good.name, replace(good, md5="0" * 32) if fault == "wrong md5" else good)
    if fault == "truncated file":
        tiny.archive.write_bytes(tiny.archive.read_bytes()[:1000])
    root = tmp_path / "root"
    with serve(tmp_path / "src") as server:
        monkeypatch.setenv(MIRROR_ENV, server.url + ("/cut" if fault == "connection cut" else ""))
        with pytest.raises(UserError) as caught:
            load_dataset("cifar10", root, progress=False)
    message = str(caught.value)
    assert "cifar-10-python.tar.gz" in message
    if fault == "wrong md5":
        assert f"md5 {good.md5}, expected {'0' * 32}" in message
    elif fault == "truncated file":
        assert f"is 1000 bytes, expected {good.size}" in message
    else:
        assert "expected" in message or "could not download" in message
    assert files_under(root) == []


def test_bad_archive_already_on_disk_is_reported_and_not_used(tmp_path, monkeypatch):
    tiny = build_cifar10(tmp_path / "src")
    publish(monkeypatch, tiny.archive)
    root = tmp_path / "root"
    root.mkdir()
    damaged = bytearray(tiny.archive.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (root / tiny.archive.name).write_bytes(bytes(damaged))
    with serve(tmp_path / "src") as server:
        monkeypatch.setenv(MIRROR_ENV, server.url)
        with pytest.raises(UserError, match="md5") as caught:
            load_dataset("cifar10", root, progress=False)
        assert server.requests == []
    assert str(root / tiny.archive.name) in str(caught.value)
    assert files_under(root) == ["cifar-10-python.tar.gz"]      # no extraction, no cache


def test_failed_extraction_leaves_no_partial_folder(tmp_path, monkeypatch):
    (tmp_path / "src" / "cifar-10-batches-wrong").mkdir(parents=True)
    (tmp_path / "src" / "cifar-10-batches-wrong" / "data_batch_1").write_bytes(b"x" * 100)
    root = tmp_path / "root"
    root.mkdir()
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-wrong", arcname="cifar-10-batches-wrong")
    publish(monkeypatch, archive)
    with pytest.raises(UserError, match="has no top folder cifar-10-batches-py/"):
        load_dataset("cifar10", root, download=False)
    assert [p.name for p in root.iterdir()] == ["cifar-10-python.tar.gz"]


def _assert_explains_how_to_get(message: str, root: Path, file_name: str) -> None:
    assert FILES[file_name].url in message
    assert MIRROR_ENV in message and str(root) in message
    assert "--suite fmnist" in message


def test_download_404_explains_how_to_get_the_data(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    root = tmp_path / "root"
    with serve(tmp_path / "empty") as server:
        monkeypatch.setenv(MIRROR_ENV, server.url)
        with pytest.raises(UserError) as caught:
            load_dataset("cifar100", root, progress=False)
    message = str(caught.value)
    assert f"could not download {server.url}/cifar-100-python.tar.gz" in message and "404" in message
    _assert_explains_how_to_get(message, root, "cifar-100-python.tar.gz")
    assert files_under(root) == []


def test_download_with_nothing_listening_explains_how_to_get_the_data(tmp_path, monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{port}")
    root = tmp_path / "root"
    with pytest.raises(UserError, match="could not download") as caught:
        load_dataset("tiny_imagenet", root, progress=False)
    _assert_explains_how_to_get(str(caught.value), root, "tiny-imagenet-200.zip")
    assert files_under(root) == []


def test_missing_dataset_without_download_says_where_it_looked(tmp_path):
    root = tmp_path / "root"
    with pytest.raises(UserError, match="not found") as caught:
        load_dataset("cifar10", root, download=False)
    message = str(caught.value)
    _assert_explains_how_to_get(message, root, "cifar-10-python.tar.gz")
    assert str(root / "cifar-10-python.tar.gz") in message and str(root / "cifar10.pt") in message
    assert files_under(root) == []


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(UserError, match="fashion_mnist, cifar10, cifar100, tiny_imagenet, digits"):
        load_dataset("mnist")


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FASTL2R_DATA", raising=False)
    assert resolve_data_root() == tmp_path / "home" / ".cache" / "fastl2r"
    monkeypatch.setenv("FASTL2R_DATA", str(tmp_path / "env"))
    assert resolve_data_root() == tmp_path / "env"
    assert resolve_data_root(tmp_path / "explicit") == tmp_path / "explicit"


# --- Fashion-MNIST -------------------------------------------------------------------------------

def _debian_installed() -> bool:
    return all((DEBIAN / name).is_file() for name in FMNIST_FILES)


needs_debian = pytest.mark.skipif(not _debian_installed(),
                                  reason=f"Debian's dataset-fashion-mnist is not installed ({DEBIAN})")


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    if not _debian_installed():
        pytest.skip(f"Debian's dataset-fashion-mnist is not installed ({DEBIAN})")
    return load_dataset("fashion_mnist", tmp_path_factory.mktemp("fmnist"), download=False, progress=False)


def test_fashion_mnist_from_debian(fashion):
    assert fashion.train_images.shape == (60000, 1, 32, 32) and fashion.test_images.shape == (10000, 1, 32, 32)
    assert fashion.classes == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    assert fashion.train_labels.bincount().tolist() == [6000] * 10
    assert fashion.test_labels.bincount().tolist() == [1000] * 10
    assert fashion.flip and fashion.channels == 1
    for images in (fashion.train_images, fashion.test_images):
        assert not images[:, :, :2].any() and not images[:, :, 30:].any()
        assert not images[:, :, :, :2].any() and not images[:, :, :, 30:].any()
    with gzip.open(DEBIAN / "train-images-idx3-ubyte.gz") as stream:   # first image at byte 16
        first = np.frombuffer(stream.read(16 + 784)[16:], dtype=np.uint8).reshape(28, 28)
    assert np.array_equal(fashion.train_images[0, 0, 2:30, 2:30].numpy(), first)
    assert fashion.train_labels[0] == 9        # the first training image is an ankle boot
    # The widely quoted Fashion-MNIST training mean is 0.2860 over 28×28; padding adds zeros.
    assert fashion.mean[0] == pytest.approx(0.2860 * 784 / 1024, abs=5e-4)


@needs_debian
@pytest.mark.parametrize("damage", ["changed byte", "truncated"])
def test_fashion_mnist_corrupt_copy_in_data_root_is_detected(tmp_path, damage):
    root = tmp_path / "root"
    (root / "fashion-mnist").mkdir(parents=True)
    content = bytearray(gzip.decompress((DEBIAN / "train-labels-idx1-ubyte.gz").read_bytes()))
    if damage == "changed byte":
        content[100] = (content[100] + 1) % 10
    else:
        content = content[:-10]
    bad = root / "fashion-mnist" / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(bytes(content)))
    with pytest.raises(UserError) as caught:
        load_dataset("fashion_mnist", root, download=False)
    message = str(caught.value)
    assert str(bad) in message
    if damage == "changed byte":
        assert f"expected {FILES[bad.name].md5}" in message
    else:
        assert "is 59998 bytes, expected 60008" in message
    assert files_under(root) == ["fashion-mnist/train-labels-idx1-ubyte.gz"]


def _tiny_fashion(folder: Path, monkeypatch) -> dict[str, np.ndarray]:
    """Four tiny idx files, with the table expecting their decompressed content."""
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte.gz": np.array([9, 0, 3, 3, 7], dtype=np.uint8),
              "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte.gz": np.array([1, 2, 8], dtype=np.uint8)}
    folder.mkdir(parents=True)
    for name, array in arrays.items():
        content = idx_gz(folder / name, array)
        monkeypatch.setitem(FILES, name, remote_matching(folder / name, content=content))
    return arrays


def test_fashion_mnist_downloads_and_verifies_decompressed_content(tmp_path, monkeypatch):
    monkeypatch.setattr(loaders, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")
    arrays = _tiny_fashion(tmp_path / "src", monkeypatch)
    root = tmp_path / "root"
    with serve(tmp_path / "src") as server:
        monkeypatch.setenv(MIRROR_ENV, server.url)
        data = load_dataset("fashion_mnist", root, progress=False)
        assert sorted(server.requests) == sorted(f"/{name}" for name in FMNIST_FILES)
    assert data.train_images.shape == (5, 1, 32, 32) and data.test_images.shape == (3, 1, 32, 32)
    assert np.array_equal(data.train_images[:, 0, 2:30, 2:30].numpy(), arrays["train-images-idx3-ubyte.gz"])
    assert np.array_equal(data.test_images[:, 0, 2:30, 2:30].numpy(), arrays["t10k-images-idx3-ubyte.gz"])
    assert data.train_labels.tolist() == [9, 0, 3, 3, 7] and data.test_labels.tolist() == [1, 2, 8]
    assert data.train_images.sum() == int(arrays["train-images-idx3-ubyte.gz"].sum(dtype=np.int64))
    assert files_under(root) == sorted(["fashion_mnist.pt"] + [f"fashion-mnist/{n}" for n in FMNIST_FILES])


def test_idx_file_with_wrong_type_code_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setattr(loaders, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")
    _tiny_fashion(tmp_path / "root" / "fashion-mnist", monkeypatch)
    images = tmp_path / "root" / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    content = bytearray(gzip.decompress(images.read_bytes()))
    content[2] = 0x09                                       # signed bytes, not unsigned
    images.write_bytes(gzip.compress(bytes(content)))
    monkeypatch.setitem(FILES, images.name, remote_matching(images, content=bytes(content)))
    with pytest.raises(UserError, match="not an idx file of unsigned bytes with 3 dimensions"):
        load_dataset("fashion_mnist", tmp_path / "root", download=False)


def test_fashion_mnist_missing_without_download_points_to_debian(tmp_path, monkeypatch):
    monkeypatch.setattr(loaders, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")
    with pytest.raises(UserError) as caught:
        load_dataset("fashion_mnist", tmp_path / "root", download=False)
    message = str(caught.value)
    assert "apt-get install dataset-fashion-mnist" in message and MIRROR_ENV in message
    assert FILES["train-images-idx3-ubyte.gz"].url in message


# --- digits --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits(digits):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    assert len(digits.train_images) + len(digits.test_images) == 1797
    assert digits.train_images.shape[1:] == (1, 32, 32) and digits.test_images.shape[1:] == (1, 32, 32)
    assert digits.num_classes == 10 and not digits.flip and digits.classes[3] == "3"
    for c in range(10):   # per class the first 70% in scikit-learn's order train, the rest test
        count = int((bunch.target == c).sum())
        assert int((digits.train_labels == c).sum()) == count * 7 // 10
        assert int((digits.test_labels == c).sum()) == count - count * 7 // 10
    first = digits.train_images[0, 0].to(torch.float32)          # sklearn's image 0 is a 0
    block_means = first.reshape(8, 4, 8, 4).mean(dim=(1, 3))
    assert (block_means - torch.from_numpy(bunch.images[0]).float() * 255 / 16).abs().mean() < 25
    assert digits.train_images.max() == 255 and digits.train_images.min() == 0


# --- make_task -----------------------------------------------------------------------------------

def test_halves_are_disjoint_and_cover_each_class(digits):
    classes = [7, 2, 5]
    whole = make_task(digits, classes)
    first = make_task(digits, classes, train_part="first_half")
    second = make_task(digits, classes, train_part="second_half")
    assert first.name == "digits[7,2,5](first half)" and whole.name == "digits[7,2,5]"
    assert not set(first.train_index.tolist()) & set(second.train_index.tolist())
    assert sorted(first.train_index.tolist() + second.train_index.tolist()) == whole.train_index.tolist()
    for c in classes:
        a = first.train_index[digits.train_labels[first.train_index] == c]
        b = second.train_index[digits.train_labels[second.train_index] == c]
        assert len(b) - len(a) in (0, 1) and a.max() < b.min()
    assert torch.equal(first.test_index, whole.test_index)
    expected_test = (digits.test_labels.unsqueeze(1) == torch.tensor(classes)).any(1).nonzero().flatten()
    assert torch.equal(whole.test_index, expected_test)


def test_labels_are_remapped_to_positions(digits):
    task = make_task(digits, [7, 2, 5])
    original = digits.train_labels[task.train_index]
    expected = torch.tensor([{7: 0, 2: 1, 5: 2}[int(c)] for c in original])
    assert torch.equal(task.train_labels(), expected)
    assert set(task.test_labels().tolist()) == {0, 1, 2} and task.num_classes == 3
    assert torch.equal(task.train_images(), digits.train_images[task.train_index])


def test_max_train_is_stratified_deterministic_and_nested(digits):
    classes = [0, 1, 2, 3]
    sizes = [int((digits.train_labels == c).sum()) for c in classes]
    task = make_task(digits, classes, max_train=40, max_test=20, seed=3)
    assert len(task.train_index) == 40 and len(task.test_index) == 20
    counts = task.train_labels().bincount(minlength=4).tolist()
    for count, size in zip(counts, sizes):
        assert abs(count - 40 * size / sum(sizes)) < 1
    assert torch.equal(make_task(digits, classes, max_train=40, max_test=20, seed=3).train_index, task.train_index)
    assert not torch.equal(make_task(digits, classes, max_train=40, seed=4).train_index, task.train_index)
    smaller = make_task(digits, classes, max_train=20, seed=3)
    assert set(smaller.train_index.tolist()) <= set(task.train_index.tolist())

    def images_of_class_0(t: Task) -> list[int]:
        return t.train_index[digits.train_labels[t.train_index] == 0].tolist()

    # a class's subset does not depend on the other classes of the task
    assert images_of_class_0(make_task(digits, [0, 1], max_train=20, seed=3)) == \
        images_of_class_0(make_task(digits, [0, 5], max_train=20, seed=3))


@pytest.mark.parametrize("kwargs, problem", [
    (dict(classes=[1, 10]), "no class \\[10\\]"),
    (dict(classes=[1, 2, 1]), "repeat"),
    (dict(classes=[]), "at least one class"),
    (dict(classes=[1, 2], train_part="middle"), "train_part"),
    (dict(classes=[1, 2, 3], max_train=2), "max_train=2"),
])
def test_make_task_rejects_bad_input(digits, kwargs, problem):
    with pytest.raises(UserError, match=problem):
        make_task(digits, **kwargs)


# --- TaskSampler ---------------------------------------------------------------------------------

def synthetic(name: str, n: int, classes: int, *, channels: int = 3, flip: bool = True, seed: int = 0) -> ImageDataset:
    """Random images (so every image and every crop of it is unique) with arbitrary statistics."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % classes
    return ImageDataset(name, images, labels, images.clone(), labels.clone(),
                        tuple(f"c{i}" for i in range(classes)),
                        mean=tuple(0.3 + 0.1 * c for c in range(channels)),
                        std=tuple(0.2 + 0.05 * c for c in range(channels)), flip=flip)


def _key(x: torch.Tensor) -> bytes:
    return x.contiguous().numpy().tobytes()


def _views(images: torch.Tensor, with_flips: bool) -> dict[bytes, tuple[int, int, int, bool]]:
    """Every crop of every zero-padded image, built by slicing: bytes -> (image, dy, dx, flipped)."""
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)))
    views = {}
    for j in range(len(images)):
        for dy in range(9):
            for dx in range(9):
                crop = padded[j, :, dy:dy + 32, dx:dx + 32]
                for flipped in (False, True) if with_flips else (False,):
                    view = np.ascontiguousarray(crop[:, :, ::-1] if flipped else crop)
                    views.setdefault(view.tobytes(), (j, dy, dx, flipped))
    return views


def _unnormalise(x: torch.Tensor, data: ImageDataset) -> torch.Tensor:
    mean = torch.tensor(data.mean).view(-1, 1, 1)
    std = torch.tensor(data.std).view(-1, 1, 1)
    return ((x * std + mean) * 255).round().to(torch.uint8)


def test_same_seed_same_batches_different_seed_different():
    task = make_task(synthetic("s", 50, 5), range(5))
    a, b = TaskSampler([task], 16, device="cpu", seed=7), TaskSampler([task], 16, device="cpu", seed=7)
    c = TaskSampler([task], 16, device="cpu", seed=8)
    for _ in range(3):
        ba, bb, bc = a.sample(), b.sample(), c.sample()
        assert torch.equal(ba.x, bb.x) and torch.equal(ba.y, bb.y) and torch.equal(ba.task, bb.task)
        assert not torch.equal(ba.x, bc.x)
    assert ba.x.dtype == torch.float32 and ba.x.shape == (16, 3, 32, 32) and ba.x.is_contiguous()
    assert ba.y.dtype == torch.int64 and ba.task.dtype == torch.int64


def test_unaugmented_batches_are_to_float_of_the_union_of_tasks():
    first = make_task(synthetic("a", 30, 3, seed=1), [0, 1, 2])
    second = make_task(synthetic("b", 40, 4, flip=False, seed=2), [3, 1])      # 20 images
    lookup = {}
    for t, task in enumerate((first, second)):
        for image, label in zip(to_float(task.train_images(), task.dataset), task.train_labels()):
            lookup[_key(image)] = (t, int(label))
    sampler = TaskSampler([first, second], 64, device="cpu", seed=0, augment=False)
    tasks_seen = []
    for _ in range(20):
        batch = sampler.sample()
        for x, y, t in zip(batch.x, batch.y, batch.task):
            assert lookup[_key(x)] == (int(t), int(y))
        tasks_seen += batch.task.tolist()
    assert np.mean(np.array(tasks_seen) == 0) == pytest.approx(30 / 50, abs=0.05)


def test_batches_are_normalised(digits):
    task = make_task(digits, range(10))
    x = TaskSampler([task], 4000, device="cpu", seed=0, augment=False).sample().x
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05


def test_crop_shifts_and_flip_is_a_mirror():
    data = synthetic("s", 12, 3, flip=True)
    task = make_task(data, range(3))
    views = _views(task.train_images(), with_flips=True)
    sampler = TaskSampler([task], 64, device="cpu", seed=0)
    found = [views[_key(image)] for _ in range(4) for image in _unnormalise(sampler.sample().x, data)]
    offsets = {(dy, dx) for _, dy, dx, _ in found}
    assert len(offsets) > 40 and (4, 4) in offsets and {0, 8} <= {dy for dy, _ in offsets}
    assert 0.35 < np.mean([flipped for *_, flipped in found]) < 0.65


def test_digits_are_never_flipped(digits):
    task = make_task(digits, [2, 3, 4, 7], max_train=12)
    views = _views(task.train_images(), with_flips=False)
    sampler = TaskSampler([task], 128, device="cpu", seed=1)
    for _ in range(3):
        for image in _unnormalise(sampler.sample().x, digits):
            assert _key(image) in views


def test_sampler_rejects_mixed_channel_counts():
    gray = make_task(synthetic("g", 10, 2, channels=1), [0, 1])
    rgb = make_task(synthetic("c", 10, 2, channels=3), [0, 1])
    with pytest.raises(UserError, match="one shape"):
        TaskSampler([gray, rgb], 8, device="cpu", seed=0)


def test_channel_stats_match_numpy():
    data = synthetic("s", 20, 2)
    mean, std = channel_stats(data.train_images)
    pixels = data.train_images.numpy().transpose(1, 0, 2, 3).reshape(3, -1) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(1), rtol=1e-9)
    np.testing.assert_allclose(std, pixels.std(1), rtol=1e-9)


# --- transforms (domain shifts) ------------------------------------------------------------------

def one_image_dataset(pixels: list[list[int]]) -> ImageDataset:
    """A dataset whose single train and test image holds ``pixels`` in its top-left corner, zeros elsewhere."""
    image = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    image[0, 0, :len(pixels), :len(pixels[0])] = torch.tensor(pixels, dtype=torch.uint8)
    labels = torch.zeros(1, dtype=torch.int64)
    return ImageDataset("one", image, labels, image.clone(), labels.clone(), ("c",),
                        mean=(0.5,), std=(0.25,), flip=True)


def test_invert_is_255_minus_each_pixel_with_its_own_statistics():
    data = one_image_dataset([[0, 10, 255]])
    inverted = transform_dataset(data, "invert")
    assert inverted.name == "one+invert" and inverted.flip and inverted.classes == ("c",)
    assert inverted.train_images[0, 0, 0, :4].tolist() == [255, 245, 0, 255]
    assert torch.equal(inverted.test_images, inverted.train_images)
    assert torch.equal(inverted.train_labels, data.train_labels)
    # the original has 1022 zeros, one 10 and one 255; the inverted image 1022 × 255, one 245, one 0
    mean = (1022 * 255 + 245) / 1024 / 255
    assert inverted.mean[0] == pytest.approx(mean, abs=1e-12)
    var = (1022 * (1 - mean) ** 2 + (245 / 255 - mean) ** 2 + mean ** 2) / 1024
    assert inverted.std[0] == pytest.approx(math.sqrt(var), abs=1e-12)
    assert transform_dataset(data, "none") is data


def test_inverted_images_normalise_to_the_negatives_of_the_originals(digits):
    inverted = transform_dataset(digits, "invert")
    assert torch.equal(inverted.train_images, 255 - digits.train_images)
    assert torch.equal(inverted.test_images, 255 - digits.test_images)
    assert inverted.mean[0] == pytest.approx(1 - digits.mean[0], abs=1e-12)
    assert inverted.std[0] == pytest.approx(digits.std[0], abs=1e-12)
    torch.testing.assert_close(to_float(inverted.test_images, inverted), -to_float(digits.test_images, digits),
                               atol=1e-5, rtol=0)


def test_rot90_is_a_counter_clockwise_quarter_turn():
    data = one_image_dataset([[0, 0, 7], [0, 0, 0], [9, 0, 0]])   # 7 at row 0, col 2; 9 at row 2, col 0
    turned = transform_dataset(data, "rot90").train_images[0, 0]
    assert turned[29, 0] == 7 and turned[31, 2] == 9 and int(turned.count_nonzero()) == 2
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 2, 32, 32), dtype=torch.uint8, generator=g)
    shifted = transform_dataset(ImageDataset("r", images, torch.zeros(3, dtype=torch.int64), images,
                                             torch.zeros(3, dtype=torch.int64), ("c",), (0.5, 0.5), (0.2, 0.2),
                                             False), "rot90")
    expected = np.stack([[np.array([[image[c, j, 31 - i] for j in range(32)] for i in range(32)])
                          for c in range(2)] for image in images.numpy()])
    assert np.array_equal(shifted.train_images.numpy(), expected) and not shifted.flip


def test_unknown_transform_lists_the_valid_ones(digits):
    with pytest.raises(UserError, match="unknown transform 'blur'; choose one of: none, invert, rot90"):
        transform_dataset(digits, "blur")
