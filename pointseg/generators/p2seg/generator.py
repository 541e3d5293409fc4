"""The P2Seg pseudo-label generator: the stage-1 network's final-stage instance map (Sec. 3, Fig. 3).

Per batch of images (``__call__`` runs the network on the whole batch,
``net_batch`` images per forward, on ``input_size`` squared inputs, by default
the stage-1 ``image_size``):

1. **I2S** -- the class map ``C``, restricted to background and the classes of
   the image's points, and the affinity ``Â`` give ``S = Â^{∘β} * C`` on the
   affinity grid (``i2s_rows: pixels``: at the class map's resolution;
   ``i2s: false``: ``C`` itself, also from a network trained with I2S); ``S`` is
   upsampled to the image and its argmax is the semantic map
   (:func:`~.targets.network_maps`).
2. **S2I** -- the components of the semantic map are matched to the points
   (:func:`~.s2i.s2i_instances`, ``priority``); a component shared by several
   points is split by the predicted offsets (``grouping: offsets``: the
   class-agnostic instance map of the offsets "times" the semantic map), by
   Eq. 1, or by PSPS's geodesic cost (``grouping: geodesic``, our
   extension); Points First gives every point a region (default box otherwise).
3. **Output** -- the instances are thing segments; if the image has stuff
   points (e.g. the ``background`` click of the VOC-panoptic protocol) the
   remaining pixels go to the nearest stuff point's segment, else they stay
   VOID. P2Seg is an instance method: stuff is not modelled beyond this.

``use_network: false`` is training-free: step 2 runs on the stage-1 semantic
map itself (the labels of ``semantic_source`` on the original image), or, with
``source_grid: g``, on that map seen on a g x g grid (:func:`~.targets.on_grid`):
what a network whose class map has that grid could reach at best.

**Uncertainty** (network only): ``1 - (p_1 - p_2)``, the margin between the two
largest per-pixel mask probabilities, where the masks are background and each
instance: ``P(background) = S_0`` and, for instance ``g`` of class ``c``,
``P(g) = S_c · softmax_{g' of class c}(-d_g' / T)_g`` with ``d_g`` the distance
from where the pixel's offset points to ``g``'s nearest point (from the pixel
itself with ``grouping: nearest_point``, and also with ``geodesic``: the
Euclidean distance stands in for the geodesic one there) and ``T`` =
``uncertainty_temperature`` pixels. High where background and an object, or
two objects, are about equally likely.

Bad input, per image: an image that is not ``(H, W, 3)``, or with no point, is
an error naming its position in the batch (the pipeline records it on that
row). Handled and counted in ``diagnostics``: no thing point (stuff only, or
VOID: ``no_thing_points``), points of different classes in one component
(``class_conflicts``), a point on background or on a component smaller than
``min_area`` (``default_boxes``), points lost by Semantic Results First
(``lost_points``).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy import ndimage

from pointseg.argmax import first_argmax
from pointseg.data.images import resize_square
from pointseg.data.record import Points
from pointseg.generators.base import PseudoLabel, SourceStage, TrainableGenerator, assemble
from pointseg.generators import build_generator, generator_class
from pointseg.generators.p2seg.config import P2SegConfig
from pointseg.generators.psps import cells_read_by, geodesic_cost, scaled_cells, upsample_labels
from pointseg.geodesic import redraw_boundary
from pointseg.generators.p2seg.s2i import GeodesicSplit, s2i_instances
from pointseg.generators.p2seg.stage1 import P2SegTrainable
from pointseg.generators.p2seg.targets import (ThingLayout, network_maps, on_grid, semantic_from_label, thing_channels,
                                              thing_layout)
from pointseg.train.engine import categories_from_meta

__all__ = ["P2SegGenerator", "band_semantic", "instance_uncertainty"]


def instance_uncertainty(prob: torch.Tensor, present: list[int], layout: ThingLayout, offsets: np.ndarray | None,
                         temperature: float) -> np.ndarray:
    """(h, w) float32 in [0, 1]: ``1 -`` the top-two margin of the mask probabilities (module docstring).

    prob : (K, h, w) semantic distribution over the channels ``present`` (0 first);
    offsets : (2, h, w) ``(dy, dx)`` or None; layout : the image's thing points
    on the same grid.
    """
    k, h, w = prob.shape
    p = prob.cpu().numpy().astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if offsets is not None:
        yy, xx = yy + offsets[0], xx + offsets[1]
    top1, top2 = p[0].copy(), np.zeros((h, w), np.float32)
    row = {c: i for i, c in enumerate(present)}
    for c in np.unique(layout.group_class):
        groups = np.flatnonzero(layout.group_class == c)
        d = np.full((len(groups), h, w), np.inf, np.float32)
        for j, g in enumerate(groups):
            for y, x in layout.point_yx[layout.point_group == g]:
                d[j] = np.minimum(d[j], np.sqrt((yy - y) ** 2 + (xx - x) ** 2))
        z = -d / temperature
        z -= z.max(0, keepdims=True)
        pi = np.exp(z)
        pi /= pi.sum(0, keepdims=True)
        for q in p[row[int(c)]] * pi:
            higher = q > top1
            top2 = np.where(higher, top1, np.maximum(top2, q))
            top1 = np.where(higher, q, top1)
    return np.clip(1.0 - (top1 - top2), 0.0, 1.0)


def band_semantic(image: np.ndarray, semantic: np.ndarray, prob: torch.Tensor, present: list[int],
                  layout: ThingLayout, band: int, beta: float, downscale: float,
                  step: float = 0.0, cost=None) -> tuple[np.ndarray, int]:
    """``foreground_band`` (our extension, EPLD's key): the semantic map's foreground / background boundary
    redrawn along colour edges. Returns ``(semantic, pixels moved)``.

    On the working grid (``downscale`` of the image, PSPS's geodesic cost: LAB
    colour + ``beta`` * Sobel boundary) the foreground (``semantic > 0``) is
    redrawn within ``band`` cells of its boundary by
    :func:`pointseg.geodesic.redraw_boundary`, the thing points seeding the
    foreground and the stuff points the background. A pixel leaving the
    foreground becomes background (0); one entering it takes its most probable
    thing channel of ``prob`` (K, H, W) over ``present`` (0 first). semantic :
    (H, W) int64 channel map, 0 background. ``cost``: that ``(edge lengths, (h, w))``
    when the caller already has them (the labelling shares one with S2I's
    :class:`~.s2i.GeodesicSplit`).
    """
    height, width = semantic.shape
    if band <= 0 or len(present) < 2:
        return semantic, 0
    cost, (h, w) = cost if cost is not None else geodesic_cost(image, downscale, 0.5, beta)
    fg = semantic > 0
    new = redraw_boundary(cost, cells_read_by(fg, h, w), band, scaled_cells(layout.point_yx, height, width, h, w),
                          scaled_cells(layout.stuff_yx, height, width, h, w), step)
    if new is None:
        return semantic, 0
    want = upsample_labels(new.astype(np.int32), height, width).astype(bool)
    moved = want != fg
    if not moved.any():
        return semantic, 0
    best_thing = np.asarray(present[1:], np.int64)[first_argmax(prob[1:], 0).cpu().numpy()]
    out = np.where(want, np.where(fg, semantic, best_thing), 0)
    return out, int(moved.sum())


class P2SegGenerator(TrainableGenerator):
    """P2Seg pseudo labels (module docstring)."""

    name = "p2seg"
    Config = P2SegConfig
    stage1 = P2SegTrainable

    def __init__(self, config, categories, net=None, net_config: dict | None = None):
        """``net`` / ``net_config``: an in-memory :class:`~.network.P2SegNet` and its stage-1
        config (``image_size``) instead of ``checkpoint``."""
        super().__init__(config, categories, net)
        self.image_size = None
        self.window = None
        class_map = "classes"
        if self.net is not None:
            train_cfg = P2SegTrainable.Config.model_validate(
                (self.net_meta.get("config") if self.net_meta else None) or net_config or {})
            self.image_size, class_map, self.window = int(train_cfg.image_size), train_cfg.class_map, train_cfg.window
            if self.net_meta:
                net_things = sorted(thing_channels(categories_from_meta(self.net_meta)))
                if net_things != sorted(thing_channels(categories)):
                    raise ValueError(f"checkpoint {self.config.checkpoint}: its thing classes {net_things} differ "
                                     f"from the dataset's {sorted(thing_channels(categories))}")
        self.channel_of = thing_channels(categories, class_map)
        self._source = None

    @property
    def input_size(self) -> int:
        """Side of the square network input: ``input_size``, else the stage-1 ``image_size``."""
        return int(self.config.input_size or self.image_size)

    @classmethod
    def uses_net(cls, config) -> bool:
        return bool(config.use_network)

    @classmethod
    def source_stage(cls, config) -> SourceStage | None:
        """The trainable ``semantic_source`` to train first (``semantic_train`` given, no checkpoint in
        ``semantic_params``) when this config reads its map: to train stage 1, or to label training-free."""
        config = config if isinstance(config, cls.Config) else cls.Config.model_validate(config)
        if config.semantic_train is None or not (cls.trains(config) or not config.use_network):
            return None
        source = generator_class(config.semantic_source)
        params = source.Config.model_validate(config.semantic_params)
        if not source.trains(params):
            return None
        return SourceStage(config.semantic_source, params, source.stage1.Config.model_validate(config.semantic_train),
                           lambda checkpoint: {"semantic_params": {**config.semantic_params, "checkpoint": checkpoint}})

    # ---------------------------------------------------------------- labelling
    def generate(self, image: np.ndarray, points: Points) -> PseudoLabel:
        return self([image], [points])[0]

    def __call__(self, images: list[np.ndarray], points: list[Points]) -> list[PseudoLabel]:
        if len(images) != len(points):
            raise ValueError(f"{len(images)} images but {len(points)} point sets")
        layouts = []
        for i, (im, pts) in enumerate(zip(images, points)):
            im = np.asarray(im)
            if im.ndim != 3 or im.shape[2] != 3:
                raise ValueError(f"batch image {i}: must be (H, W, 3) RGB, got shape {im.shape}")
            if len(pts) == 0:
                raise ValueError(f"batch image {i}: image has no points")
            layouts.append(thing_layout(pts, self.categories, self.channel_of))
        if not self.config.use_network:
            return [self._label_training_free(np.asarray(im), pts, lay) for im, pts, lay in zip(images, points, layouts)]
        labels: list[PseudoLabel] = []
        for s in range(0, len(images), self.config.net_batch):
            chunk = [np.asarray(im) for im in images[s:s + self.config.net_batch]]
            t0 = time.perf_counter()
            out = self._forward(chunk)
            per_image = (time.perf_counter() - t0) / len(chunk)
            for j, im in enumerate(chunk):
                labels.append(self._label_from_network(im, layouts[s + j], {k: v[j] for k, v in out.items()}, per_image))
        return labels

    @torch.no_grad()
    def _forward(self, images: list[np.ndarray]) -> dict[str, torch.Tensor]:
        s = self.input_size
        x = np.stack([resize_square(im, s) for im in images])
        x = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255.0).to(self.config.device)
        self.net.eval()
        return {k: v.float().cpu() for k, v in self.net(x).items()}

    def _label_from_network(self, image: np.ndarray, layout: ThingLayout, out: dict, net_seconds: float) -> PseudoLabel:
        cfg = self.config
        t0 = time.perf_counter()
        h, w = image.shape[:2]
        present = [0] + sorted({int(c) for c in layout.group_class})
        prob, semantic, offsets = network_maps(out, present, cfg, (h, w), self.input_size, window=self.window)
        moved = 0
        # PSPS's cost of the image, computed once for the band and S2I's geodesic split when either needs it
        needs_cost = ((cfg.foreground_band > 0 and len(present) >= 2)
                      or (cfg.grouping == "geodesic" and len(layout.point_yx) > 1))
        cost = geodesic_cost(image, cfg.split_downscale, 0.5, cfg.split_beta) if needs_cost else None
        if cfg.foreground_band > 0:
            semantic, moved = band_semantic(image, semantic, prob, present, layout, cfg.foreground_band,
                                            cfg.split_beta, cfg.split_downscale, cfg.band_step, cost)
        label = self._assemble(semantic, layout, offsets if cfg.grouping == "offsets" else None, image, cost)
        label.diagnostics["band_foreground_pixels"] = moved
        label.uncertainty = instance_uncertainty(prob, present, layout, offsets if cfg.grouping == "offsets" else None,
                                                 cfg.uncertainty_temperature)
        label.diagnostics.update(network_seconds=net_seconds, seconds=net_seconds + time.perf_counter() - t0,
                                 background_fraction=float((semantic == 0).mean()))
        return label

    def _label_training_free(self, image: np.ndarray, points: Points, layout: ThingLayout) -> PseudoLabel:
        t0 = time.perf_counter()
        if self._source is None:
            self._source = build_generator(self.config.semantic_source, self.config.semantic_params, self.categories)
        semantic = semantic_from_label(self._source.generate(image, points), self.channel_of)
        if self.config.source_grid:
            semantic = on_grid(semantic, self.config.source_grid)
        label = self._assemble(semantic, layout, None, image)
        label.diagnostics.update(seconds=time.perf_counter() - t0, background_fraction=float((semantic == 0).mean()))
        return label

    def _assemble(self, semantic: np.ndarray, layout: ThingLayout, offsets: np.ndarray | None,
                  image: np.ndarray, cost=None) -> PseudoLabel:
        """S2I on ``semantic`` (the image's size), then the panoptic label (module docstring, step 3).
        ``cost``: PSPS's ``(edge lengths, (h, w))`` of the image at ``split_downscale``, if already computed."""
        cfg = self.config
        size = image.shape[:2]
        split = (GeodesicSplit(image, layout.point_yx, cfg.split_beta, cfg.split_downscale,
                               within=cfg.split_within == "component", cost=cost)
                 if cfg.grouping == "geodesic" and len(layout.point_yx) > 1 else None)
        res = s2i_instances(semantic, layout.point_yx, layout.point_group, layout.group_class, cfg.priority, offsets,
                            (cfg.default_box, cfg.default_box), cfg.min_area, cfg.components, split,
                            cfg.orphans)
        assignment = np.where(res.instance >= 0, layout.things[np.maximum(res.instance, 0)]
                              if len(layout.things) else -1, -1)
        if len(layout.stuff_group):
            seeds = np.full(size, -1, np.int64)
            rc = np.clip(np.rint(layout.stuff_yx).astype(np.int64), 0, np.array(size) - 1)
            seeds[rc[:, 0], rc[:, 1]] = layout.stuff_group
            _, (ri, ci) = ndimage.distance_transform_edt(seeds < 0, return_indices=True)
            assignment = np.where(assignment < 0, seeds[ri, ci], assignment)
        diag = dict(res.counters, no_thing_points=int(len(layout.things) == 0), priority=cfg.priority,
                    semantic_source=cfg.semantic_source, network=bool(cfg.use_network))
        return assemble(assignment, layout.groups, diag)

    @classmethod
    def summarize(cls, diagnostics: list[dict]) -> dict | None:
        """S2I conflicts and fallbacks of a run: ``title``, ``images``, ``summary`` ({quantity: {mean,
        max}} of the background fraction and seconds), ``fallbacks`` ({counter: sum over images})
        and ``table`` (one row per image). None when no image carries P2Seg diagnostics."""
        rows = []
        for d in diagnostics:
            if not d or "default_boxes" not in d:
                continue
            row = {"image_id": int(d.get("image_id", -1))}
            row.update({k: int(d.get(k, 0)) for k in _COUNTERS})
            row.update({k: float(d[k]) for k in _QUANTITIES if k in d})
            rows.append(row)
        if not rows:
            return None
        rows.sort(key=lambda r: r["image_id"])
        summary = {k: {"mean": float(np.mean([r[k] for r in rows if k in r])),
                       "max": float(np.max([r[k] for r in rows if k in r]))}
                   for k in _QUANTITIES if any(k in r for r in rows)}
        return {"title": "P2Seg S2I conflicts and fallbacks (per image)", "images": len(rows), "summary": summary,
                "fallbacks": {k: int(sum(r[k] for r in rows)) for k in _COUNTERS}, "table": rows}


#: Per-image counters of :func:`~.s2i.s2i_instances` and the generator, summed by :meth:`P2SegGenerator.summarize`.
_COUNTERS = ("components", "split_components", "class_conflicts", "default_boxes", "lost_points",
             "seed_pixels_restored", "orphan_pixels", "no_thing_points")
_QUANTITIES = ("background_fraction", "seconds", "network_seconds")
