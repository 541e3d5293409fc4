"""Point2Mask: panoptic pseudo labels by optimal transport from points to pixels.

Li et al., "Point2Mask: Point-supervised Panoptic Segmentation via Optimal
Transport", ICCV 2023, Sec. 3.3 and Algorithm 1. Per image:

1. **Maps** (Sec. 3.3.1), at ``downscale`` of the image:

   * ``maps="lowlevel"`` (training-free): the LAB image (divided by 100) stands
     in for the semantic map ``P^s`` and the normalised LAB Sobel map for the
     boundary map ``P^b`` (``P^b_low``; Structured Edges is not available
     offline, see :mod:`pointseg.lowlevel`). LAB has no class channels, so all
     classes share one edge-cost map.
   * ``maps="learned"``: the trained :class:`~pointseg.models.map_net.MapNet`
     of stage 1 (:mod:`pointseg.generators.point2mask.stage1`), loaded once in
     ``__init__`` from ``checkpoint``: ``P^s`` = softmax of its semantic logits,
     ``P^b_high`` its boundary map; ``boundary_maps`` picks ``P^b_high``,
     ``P^b_low`` or both (their ``d^b`` terms add, as in the authors' code).
     With ``semantic_classes="present"`` (default) ``P^s`` is the softmax over
     the classes among the image's points only (the image-level labels the
     points give; the authors' code multiplies ``P^s`` by them), which is also
     what the map losses train (:class:`pointseg.losses.Point2MaskLossConfig`
     ``present_classes``). ``feature_weight > 0`` adds the authors' code's
     ``lambda_feat * diff_feat`` edge term with the LAB colour as the feature
     (their learned instance embedding is not reproduced); 0 = Eq. 2 alone.

2. **Cost** (Eq. 2-3): the geodesic cost on the 8-connected graph with edge
   length ``|P^s_c(k) - P^s_c(l)| + beta * max(P^b(k), P^b(l))``, where ``c`` is
   the class of the supplier: one edge-cost map per distinct class among the
   points, one :func:`pointseg.geodesic.geodesic_distance` call per class with
   all that class's points as sources. A segment with several points (P10)
   costs the minimum over its points. ``semantic_distance="l1"`` uses instead
   ``sum_c |P^s_c(k) - P^s_c(l)|`` over all class channels, one edge-cost map
   for every class, as the authors' code does (``neighbour_diff(probs, 'l1')``);
   README "Measured" compares the two.

3. **Things and stuff** (the rule of the authors' code, where stuff pixels are
   decided by the semantic prediction and only thing instances enter the
   transport): first every pixel takes the segment of minimum cost (MinCost,
   PSPS). Pixels whose minimum-cost segment is **stuff** keep it: stuff
   segments are MinCost segments. Pixels whose minimum-cost segment is a
   **thing** are the demanders; the thing segments compete for them by OT:
   with ``thing_competition="things"`` (default, the authors' code) all thing
   segments compete for all thing pixels in one problem; with ``"class"`` the
   things of each class compete for the pixels MinCost gave to things of that
   class (one problem per class: the ambiguous pixels of Point2Mask's Fig. 2
   lie between same-class instances). README "Measured" compares the two.

4. **Supplier units** ``k`` (Eq. 4, Table 5), per transport problem over its
   ``n`` pixels: ``"equal"`` -- ``n / m``; ``"nearest_point"`` -- the sizes of
   the MinCost masks; ``"nearest_centroid"`` -- ``centroid_iters`` times: move
   each supplier to the centroid of its current mask, recompute the geodesic
   costs from the centroids and reassign the problem's pixels by minimum cost;
   ``k`` are the final mask sizes. ``centroid_core < 1`` (our extension, not
   the paper's) takes each centroid over the cheapest ``centroid_core``
   fraction of the mask's pixels, so a mask that floods a large region does
   not drag its centroid out of the object. A centroid that lies outside its own mask
   (non-convex or split masks) falls back to the segment's point(s) (the
   authors' code crashes there); counted in ``diagnostics["centroid_fallbacks"]``.
   The transport cost stays the cost from the points (Eq. 3).

5. **Transport** (Eq. 1, Appendix A) with :func:`pointseg.sinkhorn.transport`
   (``solver``: ``"exact"`` default, ``"sinkhorn_log"``, or ``"reference"``,
   the paper's T = ``n_iter`` = 80 update with ``eps``), decoded by argmax
   (Algorithm 1, line 10). With ``normalize_cost`` the costs of a problem are
   divided by their maximum, so ``eps`` is relative to the cost range.
   ``assignment="mincost"`` skips the transport (Table 7's MC baseline on the
   same costs).

Bad input, per image (a ``ValueError`` names the field; otherwise a documented
fallback, counted in ``diagnostics``):

* a point with a non-finite coordinate or whose pixel ``(round(y), round(x))``
  is outside the image -- it reaches no pixel of the image: error (the
  pipeline drops such points first, :func:`pointseg.data.points.validate_points`);
* an unreachable pixel (infinite geodesic cost; cannot happen with finite
  maps, guarded anyway): its cost is set to ``10 * max finite cost + 1``
  (``unreachable_costs``);
* a supplier whose ``k`` rounds to zero: raised to ``min_supply`` pixels taken
  from the largest supplier (``zero_supply_raised``); a problem with more
  suppliers than pixels keeps its MinCost labels (``ot_skipped``);
* a seed pixel that the transport gives to another segment is given back to
  its segment (``seed_pixels_restored``): a point label is ground truth;
* all points on one pixel of the working grid with two or more segments:
  retried at full resolution (``fullres_retry``); if they still share one pixel
  the segments cannot be told apart: error;
* NaN / inf in a map (learned maps): filled from the nearest finite pixel
  (``nonfinite_map_pixels``); a map with more than half its pixels non-finite
  is an error;
* a diverged solve (eps too small for ``ot_dtype``, e.g. 1e-40 in float32): never decoded; the problem
  keeps its MinCost labels and ``ot_diverged`` counts it (``on_diverge="raise"``
  makes it an error).

Diagnostics per image: ``marginal_error_row`` / ``marginal_error_col`` (max over
the image's transport problems, pixel units), ``ot_iterations`` (max),
``plan_entropy`` (sum), ``diverged``, ``converged``, ``solver``,
``supplier_units`` and the counters above.

The package: :mod:`.config` (every knob), :mod:`.maps` (step 1), :mod:`.costs`
(step 2, Eq. 2-3), :mod:`.supply` (step 4, Eq. 4), :mod:`.generator` (steps 3
and 5: :mod:`.assign`; the generator and its report summary: :mod:`.generator`), :mod:`.stage1` (the MapNet
training of ``maps="learned"``: Sec. 3.4.1, the engine's trainable).
"""

from __future__ import annotations

from pointseg.generators.point2mask.config import Point2MaskConfig, Point2MaskTrainConfig
from pointseg.generators.point2mask.costs import class_edge_costs, group_costs
from pointseg.generators.point2mask.assign import label_image, point2mask_assignment
from pointseg.generators.point2mask.generator import Point2MaskGenerator
from pointseg.generators.point2mask.maps import TransportMaps
from pointseg.generators.point2mask.stage1 import MapNetTrainable
from pointseg.generators.point2mask.supply import supplier_units

__all__ = [
    "MapNetTrainable",
    "Point2MaskConfig",
    "Point2MaskGenerator",
    "Point2MaskTrainConfig",
    "TransportMaps",
    "class_edge_costs",
    "group_costs",
    "label_image",
    "point2mask_assignment",
    "supplier_units",
]
