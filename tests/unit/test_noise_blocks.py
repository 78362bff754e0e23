"""CFM noise drawn k patches per torch call equals k one-patch draws (engine._draw_noise relies on it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voxcpm_api.engine.batched.engine import NOISE_BLOCK_PATCHES, draw_noise


@pytest.mark.parametrize(("feat_dim", "patch"), [(64, 4), (64, 2), (16, 1), (8, 2)])
@pytest.mark.parametrize("seed", [0, 1234, 2**31 - 1])
def test_a_block_of_patches_is_the_patches_drawn_one_by_one(feat_dim: int, patch: int, seed: int) -> None:
    one_by_one = torch.Generator().manual_seed(seed)
    expected = np.stack([torch.randn((1, feat_dim, patch), generator=one_by_one)[0].numpy()
                         for _ in range(2 * NOISE_BLOCK_PATCHES + 3)])
    in_blocks = torch.Generator().manual_seed(seed)
    got = np.concatenate([draw_noise(in_blocks, n, feat_dim, patch) for n in (NOISE_BLOCK_PATCHES, 3,
                                                                              NOISE_BLOCK_PATCHES)])
    assert np.array_equal(got, expected)


def test_a_patch_not_a_multiple_of_16_values_differs_in_blocks() -> None:
    """Why the engine draws one patch at a time there: the last partial block of 16 is redrawn."""
    one_by_one = torch.Generator().manual_seed(5)
    expected = np.stack([torch.randn((1, 4, 2), generator=one_by_one)[0].numpy() for _ in range(4)])
    assert not np.array_equal(draw_noise(torch.Generator().manual_seed(5), 4, 4, 2), expected)
