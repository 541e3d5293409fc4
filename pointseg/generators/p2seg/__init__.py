"""P2Seg: instance pseudo labels by mutual distillation between a semantic and an instance map.

Wang et al., "P2Seg: Pointly-supervised Segmentation via Mutual Distillation",
ICLR 2024 (Sec. 3). Modules, in the order the data flows:

* :mod:`.s2i` -- semantic to instance: components matched to points, distance
  separation (Eq. 1), offsets (Eq. 2), Points First vs Semantic Results First;
* :mod:`.i2s` -- instance to semantic: affinity ``A``, ``S = Â^{∘β} * C`` on a
  low-resolution grid;
* :mod:`.losses` -- Eq. 3-5; :mod:`.network` -- the stride-8 network;
* :mod:`.targets` -- points / stage-1 labels / network outputs to maps;
* :mod:`.stage1` -- :class:`P2SegTrainable`, the engine's trainable (rounds);
* :mod:`.generator` -- :class:`P2SegGenerator`; :mod:`.config` -- both configs.
"""

from pointseg.generators.p2seg.config import P2SegConfig, P2SegTrainConfig
from pointseg.generators.p2seg.generator import P2SegGenerator
from pointseg.generators.p2seg.stage1 import P2SegTrainable

__all__ = ["P2SegConfig", "P2SegGenerator", "P2SegTrainConfig", "P2SegTrainable"]
