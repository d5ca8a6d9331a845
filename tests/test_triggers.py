"""Triggers pixel-exact (conventions §6, §13)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from utils.errors import UserError
from utils.triggers import BlendTrigger, PatchTrigger, badnet_pattern, blend_noise_pattern, load_image_pattern, pattern_png_bytes, read_pattern_png


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (3, 64, 64)])
def test_badnet_patch_is_exactly_the_bottom_right_3x3(shape):
    c, h, w = shape
    x = torch.full((2, c, h, w), 77, dtype=torch.uint8)
    out = PatchTrigger(badnet_pattern(shape)).apply(x)
    changed = out != x
    assert changed.sum() == 2 * c * 9
    assert (out[:, :, h - 3:, w - 3:] == 255).all()
    assert (out[:, :, :h - 3, :] == 77).all() and (out[:, :, :, :w - 3] == 77).all()


def test_patch_position_size_value_options():
    p = badnet_pattern((1, 28, 28), size=4, position="top_left", value=200)
    assert (p[0, :4, :4] == 200).all() and p.sum() == 16 * 200
    p = badnet_pattern((1, 28, 28), size=2, position=[5, 7])
    assert torch.nonzero(p[0]).tolist() == [[5, 7], [5, 8], [6, 7], [6, 8]]
    with pytest.raises(UserError, match="outside"):
        badnet_pattern((1, 28, 28), size=3, position=[27, 0])
    with pytest.raises(UserError, match="allowed"):
        badnet_pattern((1, 28, 28), position="middle")


def test_mask_file_reproduces_the_square(tmp_path):
    shape = (3, 32, 32)
    p = badnet_pattern(shape)
    f = tmp_path / "mask.png"
    f.write_bytes(pattern_png_bytes(p))
    q = load_image_pattern(f, shape)
    assert torch.equal(p, q)
    x = torch.randint(0, 256, (4, *shape), dtype=torch.uint8)
    assert torch.equal(PatchTrigger(p).apply(x), PatchTrigger(q).apply(x))


def test_blend_formula_on_hand_made_values():
    x = torch.tensor([0, 10, 100, 200, 255, 255], dtype=torch.uint8).view(1, 1, 1, 6)
    p = torch.tensor([255, 0, 50, 201, 255, 0], dtype=torch.uint8).view(1, 1, 6)
    out = BlendTrigger(p, 0.2, 0.2).apply(x)
    expected = [int(np.floor(np.clip(0.8 * a + 0.2 * b, 0, 255))) for a, b in zip(x.flatten().tolist(), p.flatten().tolist())]
    assert out.flatten().tolist() == expected == [51, 8, 90, 200, 255, 204]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 255), st.integers(0, 255), st.floats(0.01, 1.0))
def test_blend_matches_numpy_float64(a, b, alpha):
    x = torch.tensor([[[[a]]]], dtype=torch.uint8)
    p = torch.tensor([[[b]]], dtype=torch.uint8)
    out = BlendTrigger(p, alpha, alpha).apply(x).item()
    ref = np.clip((1 - alpha) * np.uint8(a) + alpha * np.uint8(b), 0, 255).astype(np.uint8)
    assert out == int(ref)


def test_blend_test_alpha_differs_from_train_alpha():
    x = torch.zeros((1, 1, 2, 2), dtype=torch.uint8)
    t = BlendTrigger(torch.full((1, 2, 2), 100, dtype=torch.uint8), 0.2, 0.5)
    assert t.apply(x, train=True).flatten().tolist() == [20] * 4
    assert t.apply(x, train=False).flatten().tolist() == [50] * 4


def test_noise_pattern_depends_only_on_its_seed():
    a = blend_noise_pattern((3, 32, 32), 0)
    torch.manual_seed(123)  # the run's global seed must not matter
    b = blend_noise_pattern((3, 32, 32), 0)
    assert torch.equal(a, b) and a.dtype == torch.uint8
    assert not torch.equal(a, blend_noise_pattern((3, 32, 32), 1))
    assert a.min() >= 0 and a.max() <= 255 and len(a.unique()) > 200


def test_pattern_png_round_trip_is_lossless(tmp_path):
    for shape in [(1, 28, 28), (3, 32, 32)]:
        p = blend_noise_pattern(shape, 5)
        (tmp_path / "p.png").write_bytes(pattern_png_bytes(p))
        assert torch.equal(read_pattern_png(tmp_path / "p.png"), p)


def test_missing_trigger_image_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_image_pattern(tmp_path / "nope.png", (3, 32, 32))
