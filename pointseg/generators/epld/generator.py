"""EPLD pseudo labels: the trained distance branch's ``M^l``, argmax over instances (Eq. 6-7).

One network pass labels a whole batch: every image is resized to the
checkpoint's ``input_size``, the batch runs through the network once, and each
image's ``M^l`` logits (``(N_b, S/8, S/8)``, its own instances only) are
resized back to its ``H x W`` (bilinear) before the softmax over instances:

    M^l = softmax_n(logits),   X^l = 1 - M^l  (Eq. 6),   label(i) = argmax_n M^l_n(i)  (Eq. 7)

Uncertainty (:attr:`PseudoLabel.uncertainty`), per pixel, from the same ``M^l``::

    u(i) = 1 - (M_(1)(i) - M_(2)(i))

where ``M_(1) >= M_(2)`` are the two largest instance probabilities at ``i``
(``M_(2) = 0`` for an image with one instance): 0 where one instance takes
all the probability, 1 where the two best tie. It needs no ground truth.

Bad input raises ``ValueError`` naming the image's position in the batch
and the problem (a point outside the image or not finite, a category outside
the label space or outside the network's classes, an image without points);
nothing is labelled for that call, so a caller can label the other images
alone. A 1-pixel segment's click is an ordinary instance (its query is its
point's feature; Eq. 2 keeps the point after erosion).
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch

from pointseg.data.points import validate_points
from pointseg.data.record import Category, Points
from pointseg.generators.base import PseudoLabel, TrainableGenerator, assemble, group_of_points
from pointseg.generators.psps import cells_read_by, geodesic_cost, scaled_points, upsample_labels
from pointseg.geodesic import (add_entry_costs, edge_costs, geodesic_distance, nearest_source, redraw_boundary,
                                split_within)
from pointseg.generators.epld.batch import network_batch
from pointseg.argmax import first_argmax
from pointseg.generators.epld.model import MASKED_LOGIT
from pointseg.generators.epld.config import EPLDConfig
from pointseg.generators.epld.trainable import EPLDTrainable
from pointseg.viz.maps import heatmap
from pointseg.viz.overlay import _title, blend, colorize, draw_points

__all__ = ["EPLDGenerator", "bilinear_matrix", "feature_edge_costs", "geodesic_thing_split", "keep_clicked_components",
           "top2_assignment", "top_two", "unit_features"]

#: Output rows resized at once when mapping ``M^l`` back to an image (bounds memory on large images).
ROW_BAND = 256


def geodesic_thing_split(image: np.ndarray, points: Points, groups, assignment: np.ndarray, beta: float,
                         downscale: float, logits: torch.Tensor | None = None, gamma: float = 0.0,
                         within_foreground: bool = False, cost=None, features: torch.Tensor | None = None,
                         feature_weight: float = 0.0) -> int:
    """``thing_split: geodesic`` / ``learned_geodesic`` (our extensions): EPLD decides foreground, a geodesic
    splits it among things.

    ``assignment`` (H, W) int, index into ``groups`` (Eq. 7's label), is
    changed in place: every pixel whose label is a thing goes to the thing
    whose clicks are nearest in PSPS's geodesic cost (:mod:`pointseg.geodesic`,
    LAB colour + ``beta`` * Sobel boundary at ``downscale`` of the size). Stuff
    pixels keep EPLD's label. With ``logits`` (N, h, w) and ``gamma > 0``
    (``learned_geodesic``), thing ``n``'s paths also pay ``gamma * X_n`` (Eq. 6,
    ``M_n`` the softmax over the image's instances on the working grid) for
    every pixel they enter (:func:`pointseg.geodesic.add_entry_costs`), so a path that leaves
    what the network calls ``n`` costs more: one Dijkstra per thing. With
    ``within_foreground`` (``split_within: foreground``) the paths stay inside
    the foreground (:func:`pointseg.geodesic.split_within`; the things' click
    cells count as foreground): a thing cannot reach another across the
    background, and a foreground pixel no path reaches gets the unrestricted
    split. ``cost``: that ``(edge lengths, (h, w))`` when the caller already has them. With ``features``
    (D, h', w'), the network's ``F^fuse``, and ``feature_weight > 0`` (``split_features``), every edge also pays
    ``feature_weight * ||F(k) - F(l)||`` (:func:`feature_edge_costs`). Returns the number of pixels whose thing
    changed.
    """
    things = [n for n, g in enumerate(groups) if g.isthing]
    if len(things) < 2:
        return 0
    height, width = assignment.shape
    cost, (h, w) = cost if cost is not None else geodesic_cost(image, downscale, 0.5, beta)
    if features is not None and feature_weight > 0:
        cost = cost + feature_weight * feature_edge_costs(features, (h, w))
    cells = scaled_points(points, height, width, h, w)
    index = np.concatenate([groups[n].point_index for n in things])
    owner = np.concatenate([np.full(len(groups[n].point_index), n) for n in things])
    isthing = np.zeros(len(groups), bool)
    isthing[things] = True
    fg = isthing[assignment]
    m = None
    if logits is not None and gamma != 0:
        m = torch.nn.functional.interpolate(logits[None].float(), size=(h, w), mode="bilinear",
                                            align_corners=False)[0].softmax(0).numpy()

    def split(edges: np.ndarray) -> np.ndarray:
        if m is None:
            return nearest_source(edges, cells[index], labels=owner)[1]
        best = np.full((h, w), np.inf)
        label = np.full((h, w), -1, np.int64)
        for n in things:
            dist = geodesic_distance(add_entry_costs(edges, gamma * (1.0 - m[n])), cells[groups[n].point_index]).min(0)
            closer = dist < best
            best[closer] = dist[closer]
            label[closer] = n
        return label

    if within_foreground:
        inside = cells_read_by(fg, h, w)
        inside[cells[index, 0], cells[index, 1]] = True
        label = split_within(split, cost, inside)  # a foreground part no thing reaches: the open split there
    else:
        label = split(cost)
    nearest = upsample_labels(label, height, width)
    changed = fg & (assignment != nearest)
    assignment[fg] = nearest[fg]
    return int(changed.sum())


def unit_features(features: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """``(D, h, w)``: ``features`` (D, h', w') resized bilinearly to ``size = (h, w)``, each pixel's vector
    L2-normalised."""
    f = torch.nn.functional.interpolate(features[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return (f / f.norm(dim=0, keepdim=True).clamp_min(1e-6)).numpy()


def feature_edge_costs(features: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """``(8, h, w)`` edge lengths ``||F(k) - F(l)||`` (:func:`pointseg.geodesic.edge_costs`) of
    :func:`unit_features` (``split_features``): 0 between pixels the features do not tell apart, at most 2."""
    return edge_costs(unit_features(features, size))


def geodesic_foreground_band(image: np.ndarray, points: Points, groups, assignment: np.ndarray, logits: torch.Tensor,
                             band: int, beta: float, downscale: float, step: float = 0.0, cost=None) -> int:
    """``foreground_band`` (our extension): EPLD's foreground / stuff boundary redrawn along colour edges.

    On the working grid (``downscale`` of the image, PSPS's geodesic cost: LAB colour + ``beta`` * Sobel
    boundary), the foreground ``F`` (pixels EPLD gives to a thing) is eroded and dilated by ``band`` cells (a
    square window of side ``2 band + 1``): the eroded foreground seeds the things' side, everything outside the
    dilated foreground seeds the stuff side, and every cell of the band in between goes to the side whose seeds
    are nearest in geodesic cost plus ``step`` per step (``sqrt 2 step`` diagonally; one multi-source Dijkstra),
    so a band of uniform colour is split in its middle, where EPLD put the boundary. Thing clicks stay foreground
    and stuff clicks stuff. ``assignment`` (H, W), index into ``groups``, is changed in place: a pixel leaving
    the foreground goes to its most probable stuff instance, one entering it to its most probable thing
    (``logits`` (N, h, w) resized; the thing split that follows may reassign it). ``cost``: PSPS's
    ``(edge lengths, (h, w))`` when the caller already has them. Returns the pixels moved.
    """
    isthing = np.array([g.isthing for g in groups])
    if band <= 0 or isthing.all() or not isthing.any():
        return 0
    height, width = assignment.shape
    cost, (h, w) = cost if cost is not None else geodesic_cost(image, downscale, 0.5, beta)
    fg = cells_read_by(isthing[assignment], h, w) if (h, w) != (height, width) else isthing[assignment]
    cells = scaled_points(points, height, width, h, w)
    clicks = [cells[g.point_index] for g in groups if g.isthing], [cells[g.point_index] for g in groups if not g.isthing]
    new_fg = redraw_boundary(cost, fg, band, *(np.concatenate(c) for c in clicks), step=step)
    if new_fg is None:
        return 0
    m = torch.nn.functional.interpolate(logits[None].float(), size=(h, w), mode="bilinear",
                                        align_corners=False)[0]
    things = torch.from_numpy(isthing)[:, None, None]
    best_thing = torch.where(things, m, -torch.inf).argmax(0).numpy()
    best_stuff = torch.where(things, -torch.inf, m).argmax(0).numpy()
    relabel = upsample_labels(np.where(new_fg, best_thing, best_stuff), height, width)
    want = upsample_labels(new_fg.astype(np.int32), height, width).astype(bool)
    moved = want != isthing[assignment]
    assignment[moved] = relabel[moved]
    return int(moved.sum())


def bilinear_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """``A`` (out, in) with ``A @ x`` = 1-D bilinear resize of ``x``, ``align_corners=False``.

    Output pixel ``o`` samples input coordinate ``c = (o + 0.5) in / out - 0.5``,
    clamped to ``[0, in - 1]``, between its two neighbours (the rule of
    ``torch.nn.functional.interpolate``). Applied on rows and columns it is the
    2-D bilinear resize, and a band of output rows needs only a band of ``A``.
    """
    c = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * in_size / out_size - 0.5).clamp(0, in_size - 1)
    lo = c.floor().long()
    hi = (lo + 1).clamp(max=in_size - 1)
    frac = (c - lo).float()
    a = torch.zeros(out_size, in_size)
    rows = torch.arange(out_size)
    a[rows, lo] += 1 - frac
    a[rows, hi] += frac
    return a


#: Images per backbone pass when labelling on a CPU (``backbone_chunk: null``): 4 a pass gave 1.60-1.67x over
#: 8 batches of 1 at 256 px, 2 a pass 1.47-1.52x and 8 a pass 1.54-1.59x (medians of 8 calls, 4 processes).
CPU_BACKBONE_CHUNK = 4


@functools.lru_cache(maxsize=32)
def _resize_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """:func:`bilinear_matrix`, built once per size pair (labelling meets the same image sizes again and
    again; the copy held here is only read)."""
    return bilinear_matrix(out_size, in_size)


@functools.lru_cache(maxsize=4)
def _pool(workers: int) -> ThreadPoolExecutor:
    """A kept pool of ``workers`` threads for the per-image work after the network (one per worker count)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="epld-label")


def keep_clicked_components(logits: torch.Tensor, cells: np.ndarray, point_instance: np.ndarray,
                            isthing: np.ndarray, rounds: int = 3) -> tuple[torch.Tensor, int]:
    """Thing masks connected to their clicks: an extension, not in EPLD (``connected_things``).

    A learned distance has no notion of contiguity, so ``argmax_n M`` can give
    a thing disconnected fragments far from its click. Here, on the logits'
    own grid: every connected part (8-connectivity) of a thing's argmax mask
    that holds none of its clicks gets that thing's logit set to
    :data:`MASKED_LOGIT` (the pixels go to their next-best instance), repeated
    ``rounds`` times (a freed part can create new fragments). Stuff masks may
    be disconnected and are left alone.

    logits : (N, h, w); cells : (P, 2) int ``(row, col)`` of the points on that
    grid; point_instance : (P,) instance of each point; isthing : (N,) bool.
    Returns the new logits and the number of grid cells taken from a thing.
    """
    logits = logits.clone()
    moved = 0
    for _ in range(rounds):
        label = first_argmax(logits, 0).numpy()
        changed = False
        for n in np.flatnonzero(isthing):
            mask = (label == n).astype(np.uint8)
            if not mask.any():
                continue
            _, comp = cv2.connectedComponents(mask, connectivity=8)
            own = cells[point_instance == n]
            keep = set(comp[own[:, 0], own[:, 1]].tolist()) - {0}
            stray = (comp > 0) & ~np.isin(comp, list(keep))
            if stray.any():
                logits[n][torch.from_numpy(stray)] = MASKED_LOGIT
                moved += int(stray.sum())
                changed = True
        if not changed:
            break
    return logits, moved


def top2_assignment(logits: torch.Tensor, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 7 and the uncertainty at ``height x width`` from one image's ``(N, h, w)`` logits.

    The logits are resized bilinearly (:func:`bilinear_matrix`, in bands of
    :data:`ROW_BAND` rows), then ``M = softmax_n``; returns ``argmax_n M``
    (H, W) int64 and ``1 - (M_(1) - M_(2))`` (H, W) float32.
    """
    n, h, w = logits.shape
    ay, ax = _resize_matrix(height, h), _resize_matrix(width, w)
    cols = logits.float() @ ax.T  # (N, h, W)
    assignment = np.empty((height, width), np.int64)
    uncertainty = np.empty((height, width), np.float32)
    for r0 in range(0, height, ROW_BAND):
        band = torch.matmul(ay[r0 : r0 + ROW_BAND], cols).softmax(0)  # (N, rows, W): the rows of every plane
        first, second, idx = top_two(band)
        assignment[r0 : r0 + ROW_BAND] = idx.numpy()
        uncertainty[r0 : r0 + ROW_BAND] = (1.0 - (first - second)).clamp(0, 1).numpy()
    return assignment, uncertainty


def top_two(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The largest and second-largest of ``values`` (N, ...) along dim 0, and the index of the largest.

    Plane by plane, with NumPy ufuncs writing into preallocated planes and no
    masked write: ``torch.topk(2, dim=0)`` over the instance axis of a
    full-resolution map is a strided reduction, and a ``torch.where`` or a
    masked fill of a plane costs 10-40 times an elementwise ``maximum`` on a
    CPU. The running pair is ``second = max(second, min(first, v))``, ``first
    = max(first, v)``; the index is ``min_n (n if values[n] == first else
    N)``, so ties go to the first index, as ``argmax``. With N = 1 the second
    value is 0 (a lone instance is certain). The work is done on the CPU and
    the results are returned on ``values``' device.
    """
    a = values.detach().cpu().numpy()
    n = len(a)
    first = a[0].copy()
    second = np.full_like(first, -np.inf) if n > 1 else np.zeros_like(first)
    smaller = np.empty_like(first)
    for k in range(1, n):
        np.minimum(first, a[k], out=smaller)
        np.maximum(second, smaller, out=second)
        np.maximum(first, a[k], out=first)
    idx = np.full(first.shape, n, np.int64)
    equal = np.empty(first.shape, bool)
    candidate = np.empty(first.shape, np.int64)
    for k in range(n):
        np.equal(a[k], first, out=equal)
        np.multiply(equal, k - n, out=candidate)  # k - n where plane k holds the maximum, 0 elsewhere
        candidate += n
        np.minimum(idx, candidate, out=idx)
    return tuple(torch.from_numpy(x).to(values.device) for x in (first, second, idx))


class EPLDGenerator(TrainableGenerator):
    """EPLD pseudo labels from a trained distance branch (module docstring)."""

    name = "epld"
    Config = EPLDConfig
    stage1 = EPLDTrainable

    def __init__(self, config, categories: dict[int, Category], net=None):
        super().__init__(config, categories, net=net)
        self.net.eval()
        layers = self.net.cfg.layers
        layer = self.config.layer
        if not (layer == -1 or 1 <= layer <= layers):
            raise ValueError(f"layer={layer}: the checkpoint has {layers} decoder layers (1..{layers}, or -1 for the last)")
        self.layer_index = layers - 1 if layer == -1 else layer - 1
        self.input_size = self.config.input_size or self.net.cfg.input_size
        if self.input_size != self.net.cfg.input_size and self.net.cfg.query_feature == "learned":
            raise ValueError(f"input_size={self.input_size}: a network with query_feature=learned (E^learn of "
                             f"{self.net.cfg.input_size // 8}^2 cells) labels at its training size only")
        self.channel_of = {c: i for i, c in enumerate(self.net.category_ids)}
        missing = sorted(set(categories) - set(self.channel_of))
        if missing:
            raise ValueError(f"checkpoint {self.config.checkpoint}: category id(s) {missing} are not among the "
                             f"{len(self.channel_of)} classes the network was trained on")

    def generate(self, image: np.ndarray, points: Points) -> PseudoLabel:
        return self([image], [points])[0]

    def _check(self, index: int, image: np.ndarray, points: Points) -> None:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image {index} of the batch: must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        if len(points) == 0:
            raise ValueError(f"image {index} of the batch: image has no points")
        _, problems = validate_points(points, image.shape[0], image.shape[1], self.categories)
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ValueError(f"image {index} of the batch: {problems[0]}{more}")

    @torch.no_grad()
    def _forward(self, images: list[np.ndarray], points: list[Points]) -> tuple[dict, dict]:
        """Checked inputs -> ``(network batch, network output)``: one forward pass for the whole batch."""
        for i, (img, pts) in enumerate(zip(images, points)):
            self._check(i, img, pts)
        batch = network_batch(images, points, self.categories, self.channel_of, self.input_size)
        device = self.config.device
        image = batch["image"].to(device)
        chunk = self.config.backbone_chunk or (CPU_BACKBONE_CHUNK if image.device.type == "cpu" else len(image))
        parts = [self.net.backbone_features(image[i : i + chunk]) for i in range(0, len(image), chunk)]
        features = [torch.cat(level) for level in zip(*parts)]
        out = self.net(image, batch["point_masks"].to(device), batch["instance_valid"].to(device),
                       batch["instance_class"].to(device), features=features)
        return batch, out

    def fuse_features(self, images: list[np.ndarray], points: list[Points]) -> torch.Tensor:
        """``(B, D, S/8, S/8)``: the network's ``F^fuse`` (Sec. 3.2) of each image seen at ``input_size`` square,
        on the CPU (the features ``split_features`` reads)."""
        return self._forward(images, points)[1]["fuse"].float().cpu()

    def __call__(self, images: list[np.ndarray], points: list[Points]) -> list[PseudoLabel]:
        if len(images) != len(points):
            raise ValueError(f"{len(images)} images but {len(points)} point sets")
        if not images:
            return []
        t0 = time.perf_counter()
        size = self.input_size
        batch, out = self._forward(images, points)
        logits = out["mask_logits"][self.layer_index].float().cpu()
        fuse = out["fuse"].float().cpu() if self.config.split_features > 0 else None
        network_s = (time.perf_counter() - t0) / len(images)

        def label_one(b: int) -> PseudoLabel:
            img, pts, groups = images[b], points[b], batch["groups"][b]
            height, width = np.asarray(img).shape[:2]
            own = logits[b, : len(groups)]
            moved = 0
            if self.config.connected_things:
                instance = group_of_points(groups, len(pts))
                own, moved = keep_clicked_components(own, scaled_points(pts, height, width, *own.shape[-2:]), instance,
                                                     np.array([g.isthing for g in groups]))
            assignment, uncertainty = top2_assignment(own, height, width)
            cfg = self.config
            cost = None  # PSPS's edge lengths, computed once for the band and the thing split
            if cfg.foreground_band > 0 or cfg.thing_split != "network":
                cost = geodesic_cost(img, cfg.split_downscale, 0.5, cfg.split_beta)
            refined = geodesic_foreground_band(img, pts, groups, assignment, own, cfg.foreground_band,
                                               cfg.split_beta, cfg.split_downscale, cfg.band_step, cost)
            split = 0
            if cfg.thing_split != "network":
                gamma = cfg.split_gamma if cfg.thing_split == "learned_geodesic" else 0.0
                split = geodesic_thing_split(img, pts, groups, assignment, cfg.split_beta, cfg.split_downscale,
                                             own, gamma, cfg.split_within == "foreground", cost,
                                             None if fuse is None else fuse[b], cfg.split_features)
            restored = 0
            if self.config.restore_points:
                rc = pts.pixels(height, width)
                for n, g in enumerate(groups):
                    at = rc[g.point_index]
                    wrong = assignment[at[:, 0], at[:, 1]] != n
                    restored += int(wrong.sum())
                    assignment[at[wrong, 0], at[wrong, 1]] = n
            diag = {"instances": len(groups), "layer": self.layer_index + 1, "input_size": size,
                    "batch_size": len(images), "network_seconds": network_s,
                    "mean_uncertainty": float(uncertainty.mean()), "restored_point_pixels": restored,
                    "fragment_cells_moved": moved, "geodesic_split_pixels": split,
                    "band_foreground_pixels": refined}
            return assemble(assignment, groups, diag, uncertainty)

        workers = min(len(images), self.config.postprocess_threads or torch.get_num_threads())
        if workers > 1:  # NumPy, OpenCV and torch release the GIL: the images of a batch share the CPUs
            return list(_pool(workers).map(label_one, range(len(images))))
        return [label_one(b) for b in range(len(images))]

    def explain(self, image: np.ndarray, points: Points) -> np.ndarray:
        """``image + points | M^1 .. M^L pseudo labels (Eq. 7) | uncertainty of the labelling layer``.

        Table 4's story on one image: each decoder layer's argmax, the queries
        re-aggregated from the previous one (Eq. 2-3).
        """
        batch, out = self._forward([image], [points])
        groups = batch["groups"][0]
        height, width = np.asarray(image).shape[:2]
        f = 256 / max(height, width)
        small = (max(1, round(height * f)), max(1, round(width * f)))
        base = cv2.resize(np.asarray(image), small[::-1], interpolation=cv2.INTER_AREA)
        pts = Points((points.xy + 0.5) * f - 0.5, points.segment, points.category_id)
        tiles = [(draw_points(base, pts), "image + points")]
        uncertainty = None
        for li, logits in enumerate(out["mask_logits"]):
            assignment, u = top2_assignment(logits[0, : len(groups)].float().cpu(), *small)
            lab = assemble(assignment, groups)
            tiles.append((blend(base, colorize(lab.id_map, lab.segments_info, self.categories)), f"M^{li + 1}"))
            if li == self.layer_index:
                uncertainty = u
        tiles.append((heatmap(uncertainty, 0.0, 1.0), f"uncertainty (M^{self.layer_index + 1})"))
        return np.concatenate([_title(t, s) for t, s in tiles], axis=1)

    @classmethod
    def summarize(cls, diagnostics: list[dict]) -> dict | None:
        rows = [d for d in diagnostics if "mean_uncertainty" in d]
        if not rows:
            return None
        return {
            "title": "EPLD distance branch",
            "summary": {
                "images": len(rows),
                "mean_instances": float(np.mean([d["instances"] for d in rows])),
                "mean_uncertainty": float(np.mean([d["mean_uncertainty"] for d in rows])),
                "restored_point_pixels": int(sum(d.get("restored_point_pixels", 0) for d in rows)),
                "network_seconds_per_image": float(np.mean([d["network_seconds"] for d in rows])),
            },
            "table": [],
        }
