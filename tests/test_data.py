"""Data kinds load as dict feeds keyed by input name (images: NCHW float32); bad data is refused before any
work, in one clear line."""
import numpy as np
import pytest

from edgec.data import load_data, split
from edgec.core.errors import DataError


def test_builtin_digits_splits_are_fixed_and_disjoint():
    train, test = load_data("builtin:digits"), load_data("builtin:digits:test")
    assert train.sample_shape == (3, 32, 32) and len(train) + len(test) == 1797
    assert set(np.unique(test.y)) == set(range(10))
    assert np.isfinite(train.x[:]).all() and abs(float(train.x[:].mean())) < 0.2
    again = load_data("builtin:digits:test")
    assert np.array_equal(again.y, test.y)


def test_npz_uint8_nhwc_and_unlabelled(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8), y=np.arange(6) % 2)
    d = load_data(str(tmp_path / "d.npz"))
    assert d.sample_shape == (3, 8, 8) and d.x.dtype == np.float32 and d.x[:].max() <= 1.0
    assert d.preprocess["layout"] == "NHWC->NCHW" and d.labelled
    np.savez(tmp_path / "u.npz", x=rng.standard_normal((4, 1, 8, 8)).astype(np.float32))
    assert not load_data(str(tmp_path / "u.npz")).labelled


def test_image_folder(tmp_path):
    from PIL import Image
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    d = load_data(str(tmp_path), image_size=32)
    assert len(d) == 6 and d.classes == ["cat", "dog"] and list(d.y) == [0, 0, 0, 1, 1, 1]
    batch = next(d.batches(4))["x"]
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == np.float32
    rest, held = split(d, 0.34)
    assert len(rest) + len(held) == 6 and set(held.y) == {0, 1}


@pytest.mark.parametrize("make,message", [
    (lambda p: np.savez(p / "d.npz", x=np.full((3, 1, 4, 4), np.nan, np.float32)), "NaN or Inf"),
    (lambda p: np.savez(p / "d.npz", y=np.zeros(3, int)), "no inputs"),
    (lambda p: np.savez(p / "d.npz", x=np.zeros((0, 1, 4, 4), np.float32)), "no samples"),
    (lambda p: np.savez(p / "d.npz", x=np.zeros((3, 1, 4, 4), np.float32), y=np.zeros(2, int)), "2 labels for 3"),
    (lambda p: np.savez(p / "d.npz", x=np.zeros((3, 1, 4, 4), np.float32), y=np.array([0.5, np.nan, 2])),
     "sample 1 has a NaN or Inf label"),
    (lambda p: (p / "d.npz").write_text("garbage"), "not a readable .npz"),
])
def test_bad_npz(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(DataError, match=message):
        load_data(str(tmp_path / "d.npz"))


def test_bad_specs_and_folders(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_data(str(tmp_path / "missing.npz"))
    with pytest.raises(DataError, match="unknown built-in"):
        load_data("builtin:cifar")
    with pytest.raises(DataError, match="no class subfolders"):
        load_data(str(tmp_path))
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="hold no images"):
        load_data(str(tmp_path))
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(DataError, match="unsupported kind"):
        load_data(str(tmp_path / "x.csv"))


def test_validate_shape_channels_and_labels():
    d = load_data("builtin:digits:test")
    with pytest.raises(DataError, match="channels"):
        d.validate((1, 1, 32, 32))
    with pytest.raises(DataError, match="shape"):
        d.validate((1, 3, 64, 64))
    with pytest.raises(DataError, match="labels span 0..9 but the model has 5 outputs"):
        d.validate((1, 3, 32, 32), num_classes=5)
    d.validate((1, 3, 32, 32), num_classes=10)


def test_a_channels_last_array_the_model_takes_as_saved_is_not_transposed(tmp_path):
    """openWakeWord's embedding model reads (N, 76, 32, 1) mel windows: the NHWC->NCHW guess made them
    (1, 76, 32) and the data was refused against the model's own shape. Bound to that shape, they stay as saved;
    a model that takes NCHW still gets its channels-last images transposed."""
    from edgec.core.feeds import InputSpec
    rng = np.random.default_rng(0)
    windows = rng.standard_normal((5, 76, 32, 1)).astype(np.float32)
    np.savez(tmp_path / "w.npz", input_1=windows)
    d = load_data(str(tmp_path / "w.npz")).bind([InputSpec("input_1", "float32", ["batch", 76, 32, 1])])
    assert d.sample_shape == (76, 32, 1) and "as saved" in d.preprocess["layout"]
    np.testing.assert_array_equal(d.x[:], windows)
    np.savez(tmp_path / "i.npz", x=rng.standard_normal((5, 8, 8, 3)).astype(np.float32))
    d = load_data(str(tmp_path / "i.npz")).bind([InputSpec("x", "float32", ["batch", 3, 8, 8])])
    assert d.sample_shape == (3, 8, 8) and d.preprocess["layout"] == "NHWC->NCHW"
