"""A toy trainable generator on the platform contract: a tiny net and its loss, nothing else.

A 1x1-conv "net" learns, from the clicks only, a per-pixel score of each class;
each pixel takes the nearest point of the best-scoring class present in the
image. The pipeline trains it (Ray Train), labels with it (Ray Data) and
exports it with no change to flows/ or operators/: ``generator.method:
tests.toy_generator:ToyGenerator``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from pointseg.generators import TrainableGenerator, TrainableGeneratorConfig, assemble, seed_groups
from pointseg.train.engine import EngineConfig, Trainable
from pointseg.train.rows import IndexCollate


class ToyTrainConfig(EngineConfig):
    steps: int = 4
    lr: float = 0.05


class ToyTrainable(Trainable):
    name = "toy"
    Config = ToyTrainConfig

    def build(self, pretrained: bool = True) -> torch.nn.Module:
        return torch.nn.Conv2d(3, len(self.categories), 1)

    def collate(self, train: bool = True) -> IndexCollate:
        ids = sorted(self.categories)

        def make_batch(records):
            pix = [torch.from_numpy(r.image[tuple(r.points.pixels(r.height, r.width).T)]).float() / 255 for r in records]
            cls = [torch.tensor([ids.index(int(c)) for c in r.points.category_id]) for r in records]
            return {"pixels": torch.cat(pix)[:, :, None, None], "classes": torch.cat(cls)}

        return IndexCollate(self.categories, make_batch)

    def loss(self, model, batch, step):
        return {"loss": torch.nn.functional.cross_entropy(model(batch["pixels"])[:, :, 0, 0], batch["classes"])}


class ToyGenerator(TrainableGenerator):
    name = "toy"
    Config = TrainableGeneratorConfig
    stage1 = ToyTrainable

    def generate(self, image, points):
        groups = seed_groups(points, self.categories)
        with torch.no_grad():
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
            score = self.net(x)[0].numpy()
        ids = sorted(int(c["id"]) for c in self.net_meta["categories"])
        rc = points.pixels(*image.shape[:2])
        best = np.full(image.shape[:2], -1, np.int64)
        present = sorted({g.category_id for g in groups})
        cls = np.array(present)[np.argmax(score[[ids.index(c) for c in present]], 0)]
        for c in present:  # nearest point of the pixel's best class
            seeds = np.full(image.shape[:2], -1, np.int64)
            for gi, g in enumerate(groups):
                if g.category_id == c:
                    seeds[rc[g.point_index, 0], rc[g.point_index, 1]] = gi
            _, (ri, ci) = ndimage.distance_transform_edt(seeds < 0, return_indices=True)
            best = np.where(cls == c, seeds[ri, ci], best)
        return assemble(best, groups)
