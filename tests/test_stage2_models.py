"""Stage-2 models and training pieces: targets, augmentation, collates, steps, prediction."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pointseg.data.panoptic_format import encode_png
from pointseg.data.record import Category
from pointseg.models.instance import build_instance_model, predict_instances
from pointseg.models.panoptic import PanopticModelConfig, build_panoptic_model, predict_panoptic
from pointseg.train.augment import PAD_ID, AugmentConfig, augment
from pointseg.train.batches import InstanceCollate, PanopticCollate, instance_losses, panoptic_losses
from pointseg.train.targets import BadShardRow, decode_label, instance_targets, panoptic_targets


def train_step(model, batch, optimizer) -> dict[str, float]:
    """One optimiser step on the model's own losses (what the engine does with a stage-2 trainable)."""
    model.train()
    losses = (panoptic_losses if "pixel_values" in batch else instance_losses)(model, batch)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optimizer.step()
    return {k: float(v.detach()) for k, v in losses.items()}

CATS = {1: Category(1, "cat", True), 2: Category(2, "dog", True), 7: Category(7, "sky", False)}
COLORS = {0: (0, 0, 0), 1: (220, 40, 40), 2: (40, 220, 40), 3: (60, 60, 250)}
# segment id -> (category id, isthing)
SEGMENTS = {1: (1, 1), 2: (2, 1), 3: (7, 0)}


def toy_id_map(h=128, w=128):
    """Sky band on top, a cat rectangle and a dog rectangle; asymmetric left/right."""
    ids = np.zeros((h, w), np.int32)
    ids[: h // 4] = 3
    ids[h // 2 : h // 2 + h // 5, w // 8 : w // 8 + w // 4] = 1
    ids[h // 2 - 5 : h - 6, w // 2 + 10 : w - 4] = 2
    return ids


def toy_image(id_map, seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros(id_map.shape + (3,), np.uint8)
    for sid, col in COLORS.items():
        img[id_map == sid] = col
    return np.clip(img.astype(int) + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)


def segments_info(id_map):
    info = []
    for sid, (cat, isthing) in SEGMENTS.items():
        ys, xs = np.nonzero(id_map == sid)
        if len(xs):
            info.append(
                dict(id=sid, category_id=cat, isthing=isthing, iscrowd=0, area=int(len(xs)),
                     bbox=[int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)], source_segment=sid)
            )
    return info


def make_row(image_id, id_map=None, image=None, info=None):
    id_map = toy_id_map() if id_map is None else id_map
    image = toy_image(id_map, image_id) if image is None else image
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return dict(
        image_id=image_id, file_name="", height=id_map.shape[0], width=id_map.shape[1], method="toy",
        config_hash="0" * 12, label_png=encode_png(id_map),
        segments_info=json.dumps(segments_info(id_map) if info is None else info),
        diagnostics="{}", seconds=0.0, error="", image=buf.getvalue(),
    )


def columnar(rows):
    """The batch format Ray Data hands a collate: dict of column -> numpy array."""
    return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


NO_AUG = dict(crop_size=128, scale_range=(1.0, 1.0), hflip_prob=0.0)


# ----------------------------------------------------------------- targets


def test_targets_reproduce_known_masks():
    ids = toy_id_map()
    id_map, info = decode_label(make_row(5, ids))
    assert np.array_equal(id_map, ids)
    t = panoptic_targets(id_map, info, {1: 0, 2: 1, 7: 2})
    assert t["class_labels"].tolist() == [0, 1, 2]
    for mask, sid in zip(t["mask_labels"], [1, 2, 3]):
        assert mask.dtype == torch.float32 and np.array_equal(mask.numpy() == 1, ids == sid)
    it = instance_targets(id_map, info, {1: 1, 2: 2})  # stuff (7) is not an instance class
    assert it["labels"].tolist() == [1, 2]
    # cat: rows 64..88, cols 16..47 -> xyxy [16, 64, 48, 89]
    assert it["boxes"][0].tolist() == [16.0, 64.0, 48.0, 89.0]
    assert np.array_equal(it["masks"][1].numpy().astype(bool), ids == 2)


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (lambda r: r.update(label_png=r["label_png"][:40] + b"garbage"), "corrupt PNG"),
        (lambda r: r.update(label_png=b""), "empty"),
        (lambda r: r.update(error="timeout"), "error"),
        (lambda r: r.update(segments_info=json.dumps(segments_info(toy_id_map())[:2])), "only in PNG \\[3\\]"),
        (lambda r: r.update(segments_info=json.dumps(segments_info(toy_id_map()) + [dict(id=9, category_id=1, area=1)])),
         "only in segments_info \\[9\\]"),
        (lambda r: r.update(segments_info=json.dumps([dict(s, area=s["area"] + 1) for s in segments_info(toy_id_map())])),
         "area"),
        (lambda r: r.update(segments_info="{not json"), "segments_info"),
        (lambda r: r.update(height=64), "shape"),
    ],
)
def test_bad_rows_raise(corrupt, reason):
    row = make_row(3)
    corrupt(row)
    with pytest.raises(BadShardRow, match=reason) as e:
        decode_label(row)
    assert e.value.image_id == 3


def test_collate_skips_and_counts_bad_rows():
    bad = make_row(2)
    bad["label_png"] = b"\x89PNG\r\n\x1a\nbroken"
    collate = PanopticCollate(CATS, augment_config=NO_AUG)
    batch = collate(columnar([make_row(1), bad, make_row(3)]))
    assert batch["image_ids"] == [1, 3]
    assert collate.skipped == 1 and collate.skip_reasons["label_png"] == 1
    assert batch["pixel_values"].shape == (2, 3, 128, 128)


# ----------------------------------------------------------------- augmentation


def test_flip_keeps_image_and_label_aligned():
    ids = toy_id_map()
    img = toy_image(ids)
    out_img, out_ids = augment(img, ids, np.random.default_rng(0), dict(NO_AUG, hflip_prob=1.0))
    assert np.array_equal(out_ids, ids[:, ::-1]) and np.array_equal(out_img, img[:, ::-1])
    assert not np.array_equal(out_ids, ids)  # the toy is asymmetric, so the flip is visible
    # the dog (id 2) sits on the right in the input, on the left after the flip
    assert np.nonzero(ids == 2)[1].mean() > 64 > np.nonzero(out_ids == 2)[1].mean()


def test_random_resize_crop_keeps_alignment_and_is_seeded():
    ids = toy_id_map(100, 150)
    img = toy_image(ids)
    cfg = AugmentConfig(crop_size=96, scale_range=(0.6, 1.8), hflip_prob=0.5)
    palette = np.array([COLORS[k] for k in range(4)])
    for seed in range(6):
        a_img, a_ids = augment(img, ids, np.random.default_rng(seed), cfg)
        b_img, b_ids = augment(img, ids, np.random.default_rng(seed), cfg)
        assert np.array_equal(a_img, b_img) and np.array_equal(a_ids, b_ids)
        assert a_img.shape == (96, 96, 3) and a_ids.shape == (96, 96) and a_ids.dtype == np.int32
        valid = a_ids != PAD_ID
        assert (a_img[~valid] == 0).all()
        # independent oracle: the colour each pixel shows names its segment
        nearest = np.argmin(((a_img[valid][:, None, :].astype(int) - palette[None]) ** 2).sum(-1), axis=1)
        assert (nearest == a_ids[valid]).mean() > 0.95
    outs = {augment(img, ids, np.random.default_rng(s), cfg)[1].tobytes() for s in range(6)}
    assert len(outs) > 1


# ----------------------------------------------------------------- models


@pytest.fixture(scope="module")
def panoptic():
    torch.manual_seed(0)
    return build_panoptic_model(PanopticModelConfig(image_size=128, train_num_points=4096), CATS)


@pytest.fixture(scope="module")
def instance():
    torch.manual_seed(0)
    return build_instance_model(dict(image_size=128), CATS)


def _params(model, names):
    named = dict(model.named_parameters())
    return {n: named[n].detach().clone() for n in names}


def test_panoptic_one_step_changes_weights(panoptic):
    model, _ = panoptic
    from pointseg.models.backbones import efficientnet_lite0_state_dict

    backbone = model.model.pixel_level_module.encoder._backbone
    ref = efficientnet_lite0_state_dict()
    assert torch.equal(backbone.state_dict()["blocks.3.0.conv_pw.weight"], ref["blocks.3.0.conv_pw.weight"])
    batch = PanopticCollate(CATS, augment_config=dict(crop_size=128), seed=1)(columnar([make_row(1), make_row(2)]))
    assert [len(c) for c in batch["class_labels"]] == [len(m) for m in batch["mask_labels"]]
    names = ["class_predictor.weight", "model.pixel_level_module.encoder._backbone.blocks.3.0.conv_pw.weight"]
    before = _params(model, names)
    torch.manual_seed(0)
    losses = train_step(model, batch, torch.optim.AdamW(model.parameters(), lr=1e-4))
    assert np.isfinite(losses["loss"]) and {"loss_mask", "loss_dice", "loss_cross_entropy"} <= set(losses)
    after = _params(model, names)
    for n in names:
        assert not torch.equal(before[n], after[n]), n


def test_instance_one_step_changes_weights(instance):
    model = instance
    batch = InstanceCollate(CATS, augment_config=dict(crop_size=128), seed=1)(columnar([make_row(1), make_row(2)]))
    assert all(set(t["labels"].tolist()) <= {1, 2} for t in batch["targets"])
    names = ["roi_heads.mask_predictor.mask_fcn_logits.weight", "backbone.body.14.conv.0.0.weight"]
    before = _params(model, names)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)
    losses = train_step(model, batch, torch.optim.SGD(params, lr=0.01, momentum=0.9))
    assert np.isfinite(losses["loss"]) and {"loss_classifier", "loss_mask", "loss_objectness"} <= set(losses)
    after = _params(model, names)
    for n in names:
        assert not torch.equal(before[n], after[n]), n
    preds = predict_instances(model, [toy_image(toy_id_map(96, 112))])
    assert preds[0]["masks"].shape[1:] == (96, 112) and preds[0]["masks"].dtype == bool
    assert set(preds[0]["labels"].tolist()) <= {1, 2}


def test_panoptic_loss_decreases_and_predicts_known_categories():
    torch.manual_seed(0)
    model, processor = build_panoptic_model(PanopticModelConfig(image_size=128, train_num_points=2048), CATS)
    batch = PanopticCollate(CATS, augment_config=NO_AUG, train=False)(columnar([make_row(7)]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = [train_step(model, batch, opt)["loss"] for _ in range(20)]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    images = [toy_image(toy_id_map()), toy_image(toy_id_map(90, 140), 3)]
    preds = predict_panoptic(model, processor, images, threshold=0.0)
    for im, (id_map, info) in zip(images, preds):
        assert id_map.shape == im.shape[:2] and id_map.dtype == np.int32
        assert {s["category_id"] for s in info} <= set(CATS)
        assert set(np.unique(id_map[id_map > 0]).tolist()) == {s["id"] for s in info}
        for s in info:
            assert s["isthing"] == int(CATS[s["category_id"]].isthing)
            assert s["area"] == int((id_map == s["id"]).sum())
        # stuff is fused: at most one segment per stuff class
        assert sum(s["category_id"] == 7 for s in info) <= 1
    # overfitting one image for 20 steps already finds the dog there: a dog segment mostly on dog pixels
    id_map, info = preds[0]
    truth = toy_id_map()
    dogs = [s for s in info if s["category_id"] == 2]
    assert dogs and max((truth[id_map == s["id"]] == 2).mean() for s in dogs) > 0.6, info


def test_collate_reads_file_name_when_no_image_bytes(tmp_path):
    ids = toy_id_map(96, 112)
    img = toy_image(ids, 4)
    path = tmp_path / "img4.png"
    Image.fromarray(img).save(path)
    row = make_row(4, ids, img)
    row.update(image=b"", file_name=str(path))
    missing = dict(row, image_id=5, file_name=str(tmp_path / "absent.png"))
    collate = InstanceCollate(CATS, augment_config=dict(crop_size=112, scale_range=(1.0, 1.0), hflip_prob=0.0))
    batch = collate([row, missing])  # a plain list of row dicts works too
    assert batch["image_ids"] == [4] and collate.skip_reasons["image"] == 1
    # no resize (longest side already 112), so the image comes back exactly, padded at the bottom
    got = (batch["images"][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(got[:96], img) and (got[96:] == 0).all()
    assert batch["targets"][0]["labels"].tolist() == [1, 2]
