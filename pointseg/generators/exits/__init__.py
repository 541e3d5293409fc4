"""EXITS: instance pseudo masks from four extreme points per object (Lee, Hwang & Kwak, CVPR 2024).

Modules, in the order the data flows:

* :mod:`.config` -- labelling config and stage-1 config (paper defaults, and what changed for a CPU);
* :mod:`.crops` -- per-object crops from the box of the extreme points, and pasting masks back;
* :mod:`.network` -- similarity extractors (a: small ViT attention, b: feature affinity), generator, mask decoder;
* :mod:`.retrieval` -- Sinkhorn transition matrix, random walk, pseudo point retrieval (Eq. 2-5);
* :mod:`.crf` -- mean-field CRF with a local colour + position kernel (Eq. 9);
* :mod:`.losses` -- MIL, point and CRF losses (Eq. 1, 8-10);
* :mod:`.stage1` -- the stage-1 trainable (warm-up, retrieval, EMA teacher);
* :mod:`.generator` -- :class:`ExitsGenerator`, the batched labeller.
"""

from pointseg.generators.exits.config import ExitsConfig, ExitsTrainConfig
from pointseg.generators.exits.generator import ExitsGenerator
from pointseg.generators.exits.stage1 import ExitsStage1

__all__ = ["ExitsConfig", "ExitsGenerator", "ExitsStage1", "ExitsTrainConfig"]
