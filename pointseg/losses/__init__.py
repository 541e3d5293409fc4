"""Training losses. ``point2mask``: the Point2Mask map losses (partial CE, LAB affinity, RGB tree, boundary)."""

from pointseg.losses.point2mask import (
    Point2MaskLossConfig,
    boundary_loss,
    boundary_targets,
    grid_mst,
    local_affinity_loss,
    partial_cross_entropy,
    point2mask_loss,
    tree_filter,
    tree_loss,
)

__all__ = [
    "Point2MaskLossConfig",
    "boundary_loss",
    "boundary_targets",
    "grid_mst",
    "local_affinity_loss",
    "partial_cross_entropy",
    "point2mask_loss",
    "tree_filter",
    "tree_loss",
]
