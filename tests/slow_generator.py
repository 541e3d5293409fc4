"""A PSPS that takes a known time per image and logs every image it labels (plug-in for the
interrupt and actor-kill tests: ``generator.method: tests.slow_generator:SlowPSPS``)."""

from __future__ import annotations

import os
import time

from pydantic import Field

from pointseg.generators.psps import PSPSConfig, PSPSGenerator


class SlowConfig(PSPSConfig):
    seconds_per_image: float = Field(0.2, ge=0)
    log_dir: str = Field("", description="each labelled image appends '<pid> <image size>' to log_dir/labelled.log")


class SlowPSPS(PSPSGenerator):
    name = "slow_psps"
    Config = SlowConfig

    def __init__(self, config, categories):
        super().__init__(config, categories)
        if self.config.log_dir:
            with open(os.path.join(self.config.log_dir, f"actor-{os.getpid()}.pid"), "w") as f:
                f.write(str(os.getpid()))

    def generate(self, image, points):
        time.sleep(self.config.seconds_per_image)
        label = super().generate(image, points)
        if self.config.log_dir:
            with open(os.path.join(self.config.log_dir, "labelled.log"), "a") as f:
                f.write(f"{os.getpid()} {float(points.xy.sum()):.3f}\n")
        return label
