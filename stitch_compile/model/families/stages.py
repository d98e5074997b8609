"""Stage-wise stitching of SN-Net v1 (Swin, ResNet, ResNet/Swin, LeViT): config ids and layer ids.

The public code stitches neighbouring anchors (i-1, i) inside chosen stages only. Per stage and
pair, equal depths use the sliding window of the DeiT code restricted to forward pairs j < k; unequal
depths map the deeper anchor's blocks onto the shallower one's by nearest interpolation and stitch
block ``idx`` of the front anchor to every later block ``i`` of the back anchor that maps to ``idx``.
Its layer ids are then ``near[:n]``, paired with the positions by list index (not by position): for
Swin-T -> Swin-S stage 2, (1, 3) uses layer 0. We keep that quirk, since the trained weights follow it.
Ids: the anchors, then per stage (ascending) and pair (ascending) its positions in order.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from ...errors import StitchError
from .snnet_v1 import stitch_positions
from .snnet_v2 import nearest_map


class StageStitch(NamedTuple):
    """One config: anchors (comb_id), stage, (front block, back block) and stitching layer id."""

    comb: tuple[int, ...]
    stage: int | None = None
    position: tuple[int, int] | None = None
    layer: int | None = None


def pair_positions(front: int, back: int) -> tuple[list[tuple[int, int]], list[int], int]:
    """(positions, layer id of each, number of stitching layers) for stage depths front <= back."""
    if front == back:
        return stitch_positions(front, forward_only=True)
    near = nearest_map(front, back)
    positions = [(idx, i) for idx in range(front) for i, e in enumerate(near) if e == idx and idx < i]
    return positions, near[:len(positions)], front


def enumerate_configs(stage_depths: Sequence[Sequence[int]], stages: Sequence[int]
                      ) -> tuple[list[StageStitch], dict[tuple[int, int], int]]:
    """Configs in id order, and the number of stitching layers per (stage, pair).

    ``stage_depths[a]`` lists anchor a's blocks per stage. The public code sorts each stage's depths
    and pairs them with the anchors in the given order, so anchors must already be ordered.
    """
    configs = [StageStitch((a,)) for a in range(len(stage_depths))]
    n_layers = {}
    for s in stages:
        depths = [d[s] for d in stage_depths]
        if depths != sorted(depths):
            raise StitchError(f"anchors must be ordered from shallow to deep, as the public code assumes; "
                              f"stage {s} has depths {depths}")
        for p in range(len(depths) - 1):
            positions, layers, n_layers[(s, p)] = pair_positions(depths[p], depths[p + 1])
            configs += [StageStitch((p, p + 1), s, pos, layer) for pos, layer in zip(positions, layers)]
    return configs, n_layers
