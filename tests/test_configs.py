"""Every shipped config under configs/ loads: pipeline configs into PipelineConfig with their
generator params valid for the generator, Tune configs into TuneConfig with a loadable base."""

from __future__ import annotations

import pytest
from conftest import ROOT

from pointseg.config import PipelineConfig, load_config
from pointseg.generators import GENERATORS
from pointseg.tuning import TuneConfig, load_base_config

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name paths relative to the repo root
    if path.name.startswith("tune_"):
        tcfg = load_config(TuneConfig, str(path))
        base = load_base_config(tcfg)
        assert base.generator.method in GENERATORS
        return
    cfg = load_config(PipelineConfig, str(path))
    gen_cls = GENERATORS[cfg.generator.method]
    gen_cls.Config.model_validate(cfg.generator.params)  # a wrong generator key fails here, by name
