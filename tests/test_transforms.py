from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, RandSpatialCrop, Resize, Rotate, SpatialCrop
from monai.utils import MAX_SEED, set_determinism

from monai_du.prior_encoder import PriorEncoder
from monai_du.transforms import (
    AssemblePriord,
    MultiViewd,
    RandCropRotate,
    brain_augmentations,
    cxr_augmentations,
)

sys.path.insert(0, str(Path(__file__).parent))
from _prior_rows import _brute_force, _manifest  # noqa: E402

# --------------------------------------------------------------------------------------------------------------------
# MultiViewd
# --------------------------------------------------------------------------------------------------------------------


def _sample_2d(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(1, 24, 20, generator=g), "age": 63.0, "sex": "F", "meta": {"id": "p1"}}


def test_multiview_2d_shape_views_differ_and_other_keys_untouched():
    data = _sample_2d()
    original = data["image"].clone()
    t = MultiViewd(keys="image", transform=cxr_augmentations((16, 16)), num_views=3)
    t.set_random_state(seed=1)
    out = t(data)
    assert out["image"].shape == (3, 1, 16, 16)
    assert out["image"].dtype == torch.float32
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.allclose(out["image"][i], out["image"][j])
    assert set(out) == set(data)
    for key in ("age", "sex", "meta"):
        assert out[key] is data[key]
    assert torch.equal(data["image"], original)  # the input dict is not modified


def test_multiview_3d_shape_and_channels():
    g = torch.Generator().manual_seed(3)
    data = {"image": torch.rand(2, 16, 14, 18, generator=g), "site": "A"}
    t = MultiViewd(keys="image", transform=brain_augmentations((12, 10, 8)), num_views=2)
    t.set_random_state(seed=0)
    out = t(data)
    assert out["image"].shape == (2, 2, 12, 10, 8)
    assert not torch.allclose(out["image"][0], out["image"][1])
    assert out["site"] == "A"


def test_multiview_views_are_successive_calls_of_a_seeded_transform():
    # reference: the per-view transform seeded the way MultiViewd documents (seed drawn from its own state),
    # called V times in a loop
    data = _sample_2d(5)
    seed, views = 11, 4
    t = MultiViewd(keys="image", transform=cxr_augmentations((16, 16)), num_views=views).set_random_state(seed)
    out = t(data)["image"]
    reference = cxr_augmentations((16, 16))
    reference.set_random_state(seed=int(np.random.RandomState(seed).randint(MAX_SEED, dtype="uint32")))
    expected = torch.stack([torch.as_tensor(reference(data["image"])) for _ in range(views)])
    torch.testing.assert_close(out, expected)


def test_multiview_reproducible_with_set_random_state():
    data = _sample_2d(2)
    a = MultiViewd("image", cxr_augmentations((16, 16)), 2).set_random_state(seed=42)(data)["image"]
    b = MultiViewd("image", cxr_augmentations((16, 16)), 2).set_random_state(seed=42)(data)["image"]
    c = MultiViewd("image", cxr_augmentations((16, 16)), 2).set_random_state(seed=43)(data)["image"]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_multiview_reproducible_through_outer_compose_and_dataloader():
    samples = [_sample_2d(i) for i in range(4)]
    pipeline = Compose([MultiViewd("image", cxr_augmentations((16, 16)), 2)])

    def one_epoch(seed: int) -> torch.Tensor:
        set_determinism(seed=seed)
        loader = DataLoader(Dataset(samples, transform=pipeline), batch_size=4, num_workers=0)
        return next(iter(loader))["image"]

    try:
        first, second, other = one_epoch(0), one_epoch(0), one_epoch(1)
    finally:
        set_determinism(seed=None)
    assert first.shape == (4, 2, 1, 16, 16)
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)


def test_multiview_identity_transform_and_numpy_input():
    image = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    out = MultiViewd("image", transform=None, num_views=3)({"image": image})["image"]
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, torch.from_numpy(image)[None].repeat(3, 1, 1, 1))


def test_multiview_multiple_keys_and_missing_keys():
    data = {"a": torch.rand(1, 8, 8), "b": torch.rand(1, 6, 6)}
    out = MultiViewd(["a", "b", "c"], transform=None, num_views=2, allow_missing_keys=True)(data)
    assert out["a"].shape == (2, 1, 8, 8) and out["b"].shape == (2, 1, 6, 6)
    assert "c" not in out
    with pytest.raises(KeyError):
        MultiViewd(["a", "c"], transform=None)(data)


def test_multiview_bad_arguments():
    with pytest.raises(ValueError, match="num_views"):
        MultiViewd("image", None, num_views=0)
    with pytest.raises(ValueError, match="callable"):
        MultiViewd("image", transform=3)
    with pytest.raises(ValueError, match="shape"):
        MultiViewd("image", None)({"image": torch.rand(5)})
    # views of different sizes (no final fixed-size step) are refused with the shapes in the message
    ragged = MultiViewd("image", RandSpatialCrop(roi_size=(2, 2), random_size=True), num_views=6)
    ragged.set_random_state(seed=0)
    with pytest.raises(ValueError, match="different shapes"):
        ragged({"image": torch.rand(1, 32, 32)})


# --------------------------------------------------------------------------------------------------------------------
# Augmentation recipes
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_shape", [(1, 40, 30), (1, 10, 12), (3, 16, 16)])
def test_cxr_recipe_keeps_requested_size(in_shape):
    recipe = cxr_augmentations((16, 24), rotate_prob=1.0, contrast_prob=1.0, noise_prob=1.0)
    recipe.set_random_state(seed=0)
    for _ in range(3):
        out = recipe(torch.rand(*in_shape))
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        assert out.shape == (in_shape[0], 16, 24)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("in_shape", [(1, 20, 16, 12), (1, 8, 8, 8)])
def test_brain_recipe_keeps_requested_size(in_shape):
    recipe = brain_augmentations(
        (10, 12, 8), affine_prob=1.0, flip_prob=1.0, blur_prob=1.0, noise_prob=1.0, bias_field_prob=1.0
    )
    recipe.set_random_state(seed=0)
    for _ in range(2):
        out = recipe(torch.rand(*in_shape))
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        assert out.shape == (1, 10, 12, 8)
        assert torch.isfinite(out).all()


def test_cxr_recipe_without_randomness_is_a_plain_resize():
    recipe = cxr_augmentations(
        (12, 10), crop_scale=(1.0, 1.0), rotate_prob=0.0, intensity_prob=0.0, contrast_prob=0.0, noise_prob=0.0
    )
    image = torch.rand(1, 30, 25, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(image[None].double(), size=(12, 10), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(recipe(image).double(), expected, rtol=1e-5, atol=1e-5)


def test_crop_rotate_crop_equals_monai_crop_then_resize():
    """Without rotation, a view is SpatialCrop of the drawn box followed by MONAI's bilinear Resize."""
    image = torch.rand(1, 80, 96, generator=torch.Generator().manual_seed(1))
    crop = RandCropRotate((64, 48), crop_scale=(0.7, 0.95), rotate_prob=0.0).set_random_state(seed=2)
    for _ in range(5):
        view = crop(image)
        top, left, height, width = crop.box
        box = SpatialCrop(roi_start=(top, left), roi_end=(top + height, left + width))(image)
        expected = Resize((64, 48), mode="bilinear", align_corners=False)(box)
        torch.testing.assert_close(view, torch.as_tensor(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("angle", [0.3, -0.12])
def test_crop_rotate_rotation_equals_monai_rotate(angle):
    rows, cols = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij")
    image = torch.exp(-((rows - 12) ** 2 + (cols - 27) ** 2) / 30)[None]  # an off-centre blob: the sense matters
    rotate = RandCropRotate((40, 40), crop_scale=(1.0, 1.0), rotate_prob=1.0)
    rotate.box, rotate.angle = (0, 0, 40, 40), angle
    expected = Rotate(angle=angle, keep_size=True, mode="bilinear", padding_mode="zeros", align_corners=False)(image)
    torch.testing.assert_close(rotate(image, randomize=False), torch.as_tensor(expected), rtol=0, atol=1e-5)


def test_crop_rotate_rotated_crop_shows_zeros_outside_the_crop():
    """A rotated view reads only the crop: an image that is 1 inside the box and 0 around it gives 1 at the centre
    and 0 in the corners (which the rotation brings from outside the crop)."""
    image = torch.zeros(1, 40, 40)
    image[:, 5:35, 5:35] = 1.0
    view = RandCropRotate((30, 30), rotate_prob=1.0)
    view.box, view.angle = (5, 5, 30, 30), math.radians(30)
    out = view(image, randomize=False)
    assert out[0, 15, 15] == pytest.approx(1.0) and out[0, 0, 0] == 0.0 and out[0, -1, -1] == 0.0
    image[:] = 1.0  # the same box in a uniform image: the corners still come from outside the crop
    assert view(image, randomize=False)[0, 0, 0] == 0.0


def test_crop_rotate_draws_inside_its_ranges_and_is_seeded():
    crop = RandCropRotate((16, 16), crop_scale=(0.7, 0.9), rotate_degrees=10.0, rotate_prob=0.5)
    crop.set_random_state(seed=3)
    angles = []
    for _ in range(400):
        crop.randomize((50, 30))
        top, left, height, width = crop.box
        assert math.ceil(0.7 * 50) <= height <= math.ceil(0.9 * 50) and math.ceil(0.7 * 30) <= width <= 27
        assert 0 <= top <= 50 - height and 0 <= left <= 30 - width  # the crop stays inside the image
        assert abs(crop.angle) <= math.radians(10.0)
        angles.append(crop.angle)
    rotated = np.mean([a != 0.0 for a in angles])
    assert 0.4 < rotated < 0.6
    image = torch.rand(1, 30, 30)
    a = RandCropRotate((16, 16)).set_random_state(seed=5)(image)
    b = RandCropRotate((16, 16)).set_random_state(seed=5)(image)
    c = RandCropRotate((16, 16)).set_random_state(seed=6)(image)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        RandCropRotate((16, 16))(torch.rand(30, 30))


def test_recipes_reject_wrong_spatial_size():
    with pytest.raises(ValueError, match="2 positive integers"):
        cxr_augmentations((16, 16, 16))
    with pytest.raises(ValueError, match="3 positive integers"):
        brain_augmentations((16, 16))
    with pytest.raises(ValueError, match="crop_scale"):
        cxr_augmentations((16, 16), crop_scale=(0.0, 1.0))


# --------------------------------------------------------------------------------------------------------------------
# AssemblePriord
# --------------------------------------------------------------------------------------------------------------------


def test_assemble_prior_writes_float32_tensor_and_keeps_keys(tmp_path):
    df = _manifest(seed=1)
    encoder = PriorEncoder(continuous=["age"], categorical=["sex", "site"]).fit(df)
    expected = _brute_force(df)
    for source in (encoder, encoder.save(tmp_path / "enc.json"), str(tmp_path / "enc.json"), encoder.to_dict()):
        t = AssemblePriord(keys=["site", "age", "sex"], encoder=source)
        for i, row in enumerate(df.to_dict("records")[:5]):
            row["image"] = torch.zeros(1, 4, 4)
            out = t(row)
            assert isinstance(out["prior"], torch.Tensor) and out["prior"].dtype == torch.float32
            assert out["prior"].shape == (3,)
            np.testing.assert_array_equal(out["prior"].numpy(), expected[i])
            for key in row:
                assert out[key] is row[key]


def test_assemble_prior_nan_age_passes_through_and_collates():
    df = pd.DataFrame({"age": [30.0, np.nan], "sex": ["M", "F"]})
    encoder = PriorEncoder(continuous=["age"], categorical=["sex"]).fit(df)
    samples = [{"image": torch.rand(1, 8, 8), "age": a, "sex": s} for a, s in zip(df["age"], df["sex"])]
    pipeline = Compose([AssemblePriord(encoder=encoder)])
    batch = next(iter(DataLoader(Dataset(samples, transform=pipeline), batch_size=2)))
    assert batch["prior"].shape == (2, 2)
    np.testing.assert_array_equal(batch["prior"].numpy(), np.array([[30.0, 1.0], [np.nan, 0.0]], dtype=np.float32))


def test_assemble_prior_key_checks():
    encoder = PriorEncoder(continuous=["age"], categorical=["sex"]).fit(pd.DataFrame({"age": [1.0], "sex": ["M"]}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['site'\]"):
        AssemblePriord(keys=["age", "sex", "site"], encoder=encoder)
    with pytest.raises(ValueError, match=r"missing attribute\(s\) \['sex'\]"):
        AssemblePriord(keys=["age"], encoder=encoder)
    with pytest.raises(ValueError, match="encoder="):
        AssemblePriord(keys=["age"])
    with pytest.raises(RuntimeError, match="not fitted"):
        AssemblePriord(encoder=PriorEncoder(continuous=["age"]))
    with pytest.raises(ValueError, match=r"no key 'sex'.*x\.png"):
        AssemblePriord(encoder=encoder)({"image": "x.png", "age": 3.0})
    out = AssemblePriord(encoder=encoder, prior_key="p", allow_missing_keys=True)({"age": 3.0})
    np.testing.assert_array_equal(out["p"].numpy(), np.array([3.0, np.nan], dtype=np.float32))
