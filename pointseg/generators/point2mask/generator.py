"""The Point2Mask generator: maps (training-free or the stage-1 MapNet) -> :func:`.assign.label_image`.

:class:`Point2MaskGenerator` runs the algorithm per image, with one batched
forward pass of the network per actor batch for ``maps="learned"``, and
summarises the optimal-transport diagnostics of a run for the report.
"""

from __future__ import annotations

import numpy as np

from pointseg.data.record import Points
from pointseg.generators.base import PseudoLabel, TrainableGenerator, seed_groups
from pointseg.generators.point2mask.assign import label_image
from pointseg.generators.point2mask.config import Point2MaskConfig
from pointseg.generators.point2mask.costs import group_costs
from pointseg.generators.point2mask.maps import TransportMaps, learned_maps, lowlevel_maps, net_maps
from pointseg.generators.point2mask.stage1 import MapNetTrainable
from pointseg.generators.psps import scaled_points, scaled_size
from pointseg.viz.maps import PointMaps, maps_panel

#: Per-image optimal-transport diagnostics summarised as mean / max in the report.
OT_QUANTITIES = ("marginal_error_row", "marginal_error_col", "ot_iterations", "plan_entropy", "ot_problems", "seconds")
#: Documented per-image fallbacks, summed over the images.
OT_COUNTERS = ("ot_diverged", "ot_skipped", "zero_supply_raised", "centroid_fallbacks", "seed_pixels_restored",
               "unreachable_costs", "nonfinite_map_pixels", "fullres_retry")


class Point2MaskGenerator(TrainableGenerator):
    """Point2Mask pseudo labels (package docstring): maps -> geodesic costs -> OT -> argmax.

    With ``maps="learned"`` the MapNet of stage 1 (:class:`MapNetTrainable`) is
    loaded once from ``checkpoint`` (or given in memory as ``net`` while it is
    being trained); its channel ``i`` is the ``i``-th id of ``sorted(categories)``
    of its training run. ``input_max_side`` runs it at another square size than
    its training ``image_size``.
    """

    name = "point2mask"
    Config = Point2MaskConfig
    stage1 = MapNetTrainable

    def __init__(self, config, categories, net=None):
        super().__init__(config, categories, net=net)
        cfg = self.config
        self.net_size: int | None = cfg.input_max_side
        self.net_categories: list[int] = sorted(int(c) for c in categories)
        if self.net_meta:
            self.net_categories = sorted(int(c["id"]) for c in self.net_meta["categories"])
            self.net_size = cfg.input_max_side or int(self.net_meta["config"]["image_size"])
        if cfg.maps == "learned":
            missing = sorted(set(categories) - set(self.net_categories))
            if missing:
                raise ValueError(f"checkpoint {cfg.checkpoint}: no semantic channel for category id(s) {missing}")

    @classmethod
    def uses_net(cls, config: Point2MaskConfig) -> bool:
        return config.maps == "learned"

    # ------------------------------------------------------------------ maps
    def maps(self, image: np.ndarray, size: tuple[int, int], net_out=None, present=None) -> TransportMaps:
        """The task-oriented maps of ``image`` at ``size = (h, w)`` (:mod:`.maps`).

        ``net_out``: the network's ``(P^s, P^b_high)`` for this image (computed
        here when None); ``present``: the category ids among the image's points.
        """
        cfg = self.config
        if cfg.maps == "lowlevel":
            return lowlevel_maps(image, size, cfg.blur_sigma)
        if net_out is None:
            net_out = net_maps(self.net, [image], self.net_size, cfg.device)[0]
        return learned_maps(image, size, net_out, self.net_categories, present, cfg.semantic_classes,
                            cfg.boundary_maps, cfg.blur_sigma, cfg.feature_weight)

    # -------------------------------------------------------------- generate
    def __call__(self, images: list[np.ndarray], points: list[Points]) -> list[PseudoLabel]:
        """Label a batch; learned maps come from one batched forward pass of the network."""
        if len(images) != len(points):
            raise ValueError(f"{len(images)} images but {len(points)} point sets")
        outs = net_maps(self.net, list(images), self.net_size, self.config.device) if self.uses_net(self.config) \
            else [None] * len(images)
        return [self.generate(im, pts, net_out=o) for im, pts, o in zip(images, points, outs)]

    def generate(self, image: np.ndarray, points: Points, net_out=None) -> PseudoLabel:
        """Label one image (``net_out``: see :meth:`maps`)."""
        return label_image(image, points, self.config, self.categories,
                           lambda im, size, present: self.maps(im, size, net_out, present))

    # ---------------------------------------------------------------- report
    @classmethod
    def summarize(cls, diagnostics: list[dict]) -> dict | None:
        """Optimal-transport diagnostics of a run (per image: marginal errors in pixel units, max over
        the image's problems; iterations; plan entropy; diverged / converged; the fallback counters).

        Returns None when no image carries OT diagnostics; otherwise ``title``,
        ``images``, ``solvers`` (count per solver), ``summary`` ({quantity: {mean,
        max}}), ``diverged_images``, ``not_converged_images``, ``fallbacks``
        ({counter: sum}) and ``table`` (one row per image).
        """
        rows = []
        for d in diagnostics:
            if "marginal_error_row" not in d:
                continue
            row = {"image_id": int(d.get("image_id", -1)), "solver": d.get("solver"),
                   "diverged": bool(d.get("diverged", False)), "converged": bool(d.get("converged", True))}
            row.update({k: float(d.get(k, 0.0)) for k in OT_QUANTITIES})
            row.update({k: int(d.get(k, 0)) for k in OT_COUNTERS})
            rows.append(row)
        if not rows:
            return None
        rows.sort(key=lambda r: r["image_id"])
        solvers: dict[str, int] = {}
        for r in rows:
            solvers[str(r["solver"])] = solvers.get(str(r["solver"]), 0) + 1
        transported = any(r["ot_problems"] for r in rows)
        fallbacks = {k: int(sum(r[k] for r in rows)) for k in OT_COUNTERS}
        return {
            "title": "Optimal transport diagnostics (per image)",
            "images": len(rows),
            "solvers": solvers,
            "summary": {k: {"mean": float(np.mean([r[k] for r in rows])), "max": float(np.max([r[k] for r in rows]))}
                        for k in OT_QUANTITIES},
            "diverged_images": sum(r["diverged"] for r in rows),
            "not_converged_images": sum(not r["converged"] for r in rows),
            "fallbacks": fallbacks,
            "note": None if transported else (
                "No transport problem was solved (assignment `mincost`, or no image with two or more things); "
                "counted fallbacks: " + (", ".join(f"{k} {v}" for k, v in fallbacks.items() if v) or "none") + "."),
            "table": rows,
        }

    def inner_maps(self, image: np.ndarray, points: Points) -> PointMaps:
        """The maps and the cost map ``min_i c_ij`` (Eq. 3) of one image, as :meth:`generate` computes them."""
        cfg = self.config
        height, width = image.shape[:2]
        h, w = scaled_size(height, width, cfg.downscale)
        sources = scaled_points(points, height, width, h, w)
        groups = seed_groups(points, self.categories)
        maps = self.maps(image, (h, w), present=sorted({g.category_id for g in groups}))
        costs = group_costs(maps, sources, groups, cfg.beta, cfg.use_semantic, cfg.use_boundary, cfg.semantic_distance)
        channel_ids = None
        if maps.channel_of is not None:
            channel_ids = [c for c, _ in sorted(maps.channel_of.items(), key=lambda kv: kv[1])]
        small = Points(sources[:, ::-1].astype(np.float64), points.segment, points.category_id)
        names = ("P^b high", "P^b low") if cfg.maps == "learned" and cfg.boundary_maps != "low" else ("P^b low (LAB Sobel)", "")
        return PointMaps(maps.semantic, channel_ids, maps.boundary, maps.boundary_extra, costs.min(0), small, names)

    def explain(self, image: np.ndarray, points: Points) -> np.ndarray | None:
        """``P^s`` (max prob, argmax class), ``P^b`` and the geodesic cost min over points (Eq. 3)."""
        return maps_panel(image, self.inner_maps(image, points), self.categories)
