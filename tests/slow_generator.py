"""A PSPS that takes a known time to start and per image and logs every image it labels (plug-in for
the interrupt, actor-kill and actor-start tests: ``generator.method: tests.slow_generator:SlowPSPS``)."""

from __future__ import annotations

import os
import time

from pydantic import Field

from pointseg.generators.psps import PSPSConfig, PSPSGenerator


class SlowConfig(PSPSConfig):
    seconds_per_image: float = Field(0.2, ge=0)
    start_seconds: float = Field(0.0, ge=0, description="seconds the constructor sleeps (a slow-starting actor)")
    log_dir: str = Field("", description="each labelled image appends '<pid> <image size>' to log_dir/labelled.log")


class SlowPSPS(PSPSGenerator):
    name = "slow_psps"
    Config = SlowConfig

    def __init__(self, config, categories):
        super().__init__(config, categories)
        time.sleep(self.config.start_seconds)
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
