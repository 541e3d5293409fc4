"""EXITS stage 1 (Sec. 3.2, Fig. 3): train the pseudo-label generator from extreme points alone.

One :class:`~pointseg.train.engine.Trainable`, run by the one engine
(:func:`~pointseg.train.engine.fit_plain` here, Ray Train in the pipeline):

1. **Warm-up** (option a, steps ``< warmup_steps``): the similarity
   extractor, a small ViT, learns box masks with the MIL loss (Eq. 1). It is
   frozen from then on.
2. **Generator** (the remaining steps): per object crop,

   * ``S`` = the extractor's head-averaged attention (or the feature
     affinity, option b), ``T = (A + A^T)/2``, ``A = Sinkhorn(S)`` (Eq. 2);
   * ``P_FG`` = the inward extreme points, ``P_BG`` = the cells outside the
     box; ``alpha``-hop random-walk scores give ``P^_FG``, ``P^_BG`` (Eq. 3-5),
     thinned by point dropout (a fresh draw every step, and every object is
     seen once per epoch, so once per epoch);
   * ``L = lambda_point L_point + lambda_crf L_crf`` (Eq. 8-10), with
     ``L_crf`` against the CRF of the mean of the student's and the EMA
     teacher's masks.

Rows are index rows (``rows = "index"``): :class:`~pointseg.train.rows.IndexCollate`
decodes each image and :func:`object_batch` crops its objects. Ground-truth
masks are never read.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from pointseg.data.record import Category, ImageRecord
from pointseg.generators.exits.config import ExitsTrainConfig
from pointseg.generators.exits.crf import mean_field_crf
from pointseg.generators.exits.crops import crop_images, crop_windows, grid_sets, to_crop
from pointseg.generators.exits.losses import crf_loss, mil_loss, point_loss
from pointseg.generators.exits.network import ExitsNet, FeatureAffinity
from pointseg.generators.exits.retrieval import inward_points, point_dropout, retrieve_points, transition_matrix
from pointseg.generators.extreme_baselines import ExtremeObject, extreme_objects
from pointseg.train.engine import Trainable, unwrap
from pointseg.train.rows import IndexCollate

__all__ = ["ExitsStage1", "object_batch", "crop_objects", "box_masks", "retrieve_for_batch"]


def _edges_to_crop(rects: np.ndarray, windows: np.ndarray, size: int) -> np.ndarray:
    """(K, 4) edge-coordinate rectangles -> crop coordinates."""
    w = np.asarray(windows, np.float64)
    sx, sy = size / (w[:, 2] - w[:, 0]), size / (w[:, 3] - w[:, 1])
    r = np.asarray(rects, np.float64)
    return np.stack([(r[:, 0] - w[:, 0]) * sx, (r[:, 1] - w[:, 1]) * sy,
                     (r[:, 2] - w[:, 0]) * sx, (r[:, 3] - w[:, 1]) * sy], 1)


def crop_objects(image: np.ndarray, objects: list[ExtremeObject], cfg: ExitsTrainConfig,
                 rng: np.random.Generator | None = None) -> dict:
    """The crops of one image's objects and their geometry in crop coordinates.

    ``rng`` (training) draws each side's margin from ``crop_margin + U(0,
    crop_jitter)``, so the box does not sit at one fixed place in every crop
    (else a network learns the box from the position alone). The draw is
    one-sided: a margin below ``crop_margin`` (the labelling margin) can leave
    a side with no cell outside the box, so no ``P_BG`` there, and with the
    retrieved points the point loss then rewards filling the whole crop. Returns ``crops`` (K, 3, S, S) float in
    [0, 1], ``windows`` (K, 4) image
    edge coordinates, and (crop coordinates, float32 tensors) ``extremes``
    (K, 4, 2) pixel centres of top/left/bottom/right, ``boxes`` (K, 4) and
    ``valid`` (K, 4) the image's extent.
    """
    h, w = image.shape[:2]
    S = cfg.crop_size
    boxes = np.array([o.box for o in objects], np.float64).reshape(-1, 4)
    margin = cfg.crop_margin
    if rng is not None and cfg.crop_jitter > 0:  # each side's margin drawn from [crop_margin, + crop_jitter]
        margin = margin + rng.uniform(0.0, cfg.crop_jitter, (len(objects), 4))
    windows = crop_windows(boxes, margin)
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255
    crops = crop_images(tensor, windows, S)
    extremes = to_crop(np.stack([o.extremes for o in objects]).reshape(-1, 4, 2), windows, S)
    edge_boxes = boxes + np.array([0, 0, 1, 1])
    valid = np.tile(np.array([[0, 0, w, h]], np.float64), (len(objects), 1))
    return {"crops": crops, "windows": windows,
            "extremes": torch.as_tensor(extremes, dtype=torch.float32),
            "boxes": torch.as_tensor(_edges_to_crop(edge_boxes, windows, S), dtype=torch.float32),
            "valid": torch.as_tensor(_edges_to_crop(valid, windows, S), dtype=torch.float32)}


def _flip(batch: dict, flip: torch.Tensor, size: int) -> None:
    """Mirror the crops where ``flip`` (K,) and their coordinates with them (in place)."""
    if not flip.any():
        return
    batch["crops"][flip] = batch["crops"][flip].flip(-1)
    e = batch["extremes"][flip]
    e[..., 0] = size - e[..., 0]
    batch["extremes"][flip] = e[:, [0, 3, 2, 1]]  # left and right swap roles
    for key in ("boxes", "valid"):
        r = batch[key][flip]
        batch[key][flip] = torch.stack([size - r[:, 2], r[:, 1], size - r[:, 0], r[:, 3]], 1)


def object_batch(records: list[ImageRecord], categories: dict[int, Category], cfg: ExitsTrainConfig,
                 epoch: int, train: bool = True) -> dict:
    """Records -> a batch of object crops: ``crop_objects``' keys (``windows`` as a float64 tensor)
    plus ``objects``, the (image_id, segment) of each crop, and ``epoch``.

    Objects whose extreme points are degenerate, too small or incomplete are
    not trained on. At most ``max_objects_per_step`` objects are kept (a
    draw seeded by the epoch and the image ids); ``train`` also jitters the
    crop margins and flips half of the crops.
    """
    parts, keys = [], []
    rng = np.random.default_rng([cfg.seed, epoch, *[int(r.image_id) for r in records]])
    for rec in records:
        _, objects = extreme_objects(rec.points, categories, rec.height, rec.width, cfg.min_object_px)
        objects = [o for o in objects if o.status == "ok" and not o.problems["incomplete"]]
        if objects:
            parts.append(crop_objects(rec.image, objects, cfg, rng if train else None))
            keys += [(rec.image_id, o.segment) for o in objects]
    S = cfg.crop_size
    if not parts:
        empty = torch.zeros(0, 4)
        return {"crops": torch.zeros(0, 3, S, S), "extremes": torch.zeros(0, 4, 2), "boxes": empty,
                "valid": empty, "windows": empty.double(), "objects": [], "epoch": epoch}
    for p in parts:
        p["windows"] = torch.as_tensor(p["windows"])
    batch = {k: torch.cat([p[k] for p in parts]) for k in ("crops", "extremes", "boxes", "valid", "windows")}
    keep = np.sort(rng.permutation(len(keys))[: cfg.max_objects_per_step])
    batch = {k: v[torch.as_tensor(keep)] for k, v in batch.items()}
    if train and cfg.flip:
        _flip(batch, torch.as_tensor(rng.random(len(keep)) < 0.5), S)
    batch["objects"] = [keys[i] for i in keep]
    batch["epoch"] = epoch
    return batch


def box_masks(boxes: torch.Tensor, out: int, size: int) -> torch.Tensor:
    """``Y_box`` (B, 1, out, out): cells of an ``out`` grid over the crop whose centres are in the box."""
    c = (torch.arange(out, dtype=torch.float32) + 0.5) * size / out
    inx = (c[None] >= boxes[:, 0:1]) & (c[None] < boxes[:, 2:3])
    iny = (c[None] >= boxes[:, 1:2]) & (c[None] < boxes[:, 3:4])
    return (iny[:, :, None] & inx[:, None, :]).float()[:, None]


def retrieve_for_batch(similarity, batch: dict, cfg: ExitsTrainConfig, alpha: int | None = None) -> dict:
    """Eq. 2-5 on a batch of crops: ``fg``, ``bg``, ``in_box`` (P_FG, P_BG, P_Box), ``fg_hat``, ``bg_hat``.

    similarity : crops (B, 3, S, S) -> S (B, n, n). All (B, N*N) bool, before
    point dropout. The thresholds are rescaled to ``n`` nodes when
    ``tau_reference_nodes`` is set (:mod:`~pointseg.generators.exits.config`).
    """
    N, n = cfg.grid, cfg.grid**2
    fg_points = inward_points(batch["extremes"], cfg.delta * cfg.crop_size)
    fg, bg, in_box = grid_sets(fg_points, batch["boxes"], batch["valid"], N, cfg.patch)
    scale = cfg.tau_reference_nodes / n if cfg.tau_reference_nodes else 1.0
    T = transition_matrix(similarity(batch["crops"]), n_iter=cfg.sinkhorn_iters)
    fg_hat, bg_hat, diff = retrieve_points(T, fg, bg, in_box, cfg.alpha if alpha is None else alpha,
                                           cfg.tau_fg * scale, cfg.tau_bg * scale)
    return {"fg": fg, "bg": bg, "in_box": in_box, "fg_hat": fg_hat, "bg_hat": bg_hat, "score": diff}


class ExitsStage1(Trainable):
    """Stage 1 of EXITS on the engine (module docstring)."""

    name = "exits"
    Config = ExitsTrainConfig
    rows = "index"

    def __init__(self, config, categories, context=None):
        super().__init__(config, categories, context)
        self.teacher: torch.nn.Module | None = None
        self.affinity: FeatureAffinity | None = None
        self._teacher_state: dict | None = None

    def build(self, pretrained: bool = True) -> ExitsNet:
        return ExitsNet(self.config, pretrained)

    def collate(self, train: bool = True) -> IndexCollate:
        collate = IndexCollate(self.categories, make_batch=lambda records: object_batch(
            records, self.categories, self.config, collate.epoch, train))
        return collate

    def start(self, model: torch.nn.Module) -> None:
        net = unwrap(model)
        self.teacher = copy.deepcopy(net.generator).requires_grad_(False).eval()
        if self._teacher_state is not None:
            self.teacher.load_state_dict(self._teacher_state)
        if self.config.similarity == "feature_cosine":
            self.affinity = FeatureAffinity(self.config.feature_temperature).to(next(net.parameters()).device)

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        if step <= self.warmup_steps:
            return  # the generator has not moved yet
        m = self.config.ema_momentum
        with torch.no_grad():
            for t, s in zip(self.teacher.state_dict().values(), unwrap(model).generator.state_dict().values()):
                if t.dtype.is_floating_point:
                    t.mul_(m).add_(s.detach(), alpha=1 - m)
                else:
                    t.copy_(s)

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict()} if self.teacher is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._teacher_state = state.get("teacher")

    @property
    def warmup_steps(self) -> int:
        return self.config.warmup_steps if self.config.similarity == "vit_attention" else 0

    def similarity_fn(self, model: torch.nn.Module):
        """crops -> S of the frozen extractor (option a) or the feature affinity (option b)."""
        if self.affinity is not None:
            return self.affinity.similarity
        extractor = unwrap(model).extractor
        extractor.eval()
        return extractor.similarity

    def loss(self, model, batch: dict, step: int) -> dict[str, torch.Tensor]:
        cfg = self.config
        crops = batch["crops"]
        if len(crops) == 0:  # every object of the batch was unusable
            return {"loss": sum(p.sum() * 0 for p in model.parameters() if p.requires_grad)}
        out = cfg.grid * cfg.upsample
        box = box_masks(batch["boxes"], out, cfg.crop_size)
        if step < self.warmup_steps:
            mil = mil_loss(torch.sigmoid(model(crops, "extractor")), box).mean()
            return {"loss": mil, "mil_warmup": mil.detach()}
        logits, trunk = model(crops, "generator_trunk")
        mask = torch.sigmoid(logits)
        shared = self.affinity is not None and unwrap(model).generator.frozen_backbone
        with torch.no_grad():
            # the frozen ImageNet trunk is the affinity's own backbone: reuse its features
            similarity = (lambda _: self.affinity.similarity_from_features(trunk)) if shared else \
                self.similarity_fn(model)
            r = retrieve_for_batch(similarity, batch, cfg)
        fg_hat, bg_hat = r["fg_hat"], r["bg_hat"]
        if not cfg.use_retrieved_points:
            fg_hat, bg_hat = torch.zeros_like(fg_hat), torch.zeros_like(bg_hat)
        retrieved_any = (fg_hat | bg_hat).any(1)
        if cfg.mil == "always":  # not the paper's Eq. 8 (config note): MIL for every object
            retrieved_any = torch.zeros_like(retrieved_any)
        g = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + int(step))
        fg_kept = point_dropout(fg_hat, cfg.point_dropout, g)
        bg_kept = point_dropout(bg_hat, cfg.point_dropout, g)
        B, N = len(crops), cfg.grid
        target = (r["fg"] | fg_kept).float().view(B, N, N)                       # Eq. 6
        known = (r["fg"] | fg_kept | r["bg"] | bg_kept).float().view(B, N, N)     # Eq. 7
        l_point = point_loss(mask, target, known, retrieved_any, box, cfg.lambda_mil)  # Eq. 8
        with torch.no_grad():
            # a frozen trunk is the same in the teacher: only its head runs again
            teacher = self.teacher.head(trunk) if self.teacher.frozen_backbone else self.teacher(crops)
            m_avg = (mask.detach() + torch.sigmoid(teacher)) / 2
            refined = mean_field_crf(m_avg, F.interpolate(crops, size=mask.shape[-2:], mode="area"), cfg.crf_iters,
                                     cfg.crf_dilation, cfg.crf_theta_color, cfg.crf_theta_pos,
                                     cfg.crf_w_appearance, cfg.crf_w_smooth)
        l_crf = crf_loss(mask, refined)  # Eq. 9
        total = cfg.lambda_point * l_point.mean() + cfg.lambda_crf * l_crf.mean()  # Eq. 10
        in_box = r["in_box"].sum(1).clamp_min(1)
        return {"loss": total, "point": l_point.mean().detach(), "crf": l_crf.mean().detach(),
                "retrieved_fg": (fg_hat.sum(1) / in_box).mean(), "retrieved_bg": (bg_hat.sum(1) / in_box).mean(),
                "mil_fallback": (~retrieved_any).float().mean(), "objects": torch.tensor(float(B))}
