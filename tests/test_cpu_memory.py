"""keep_freed_memory: freed blocks are reused without new page faults (glibc), checked in fresh processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

# Five "calls", each holding three 16 MiB arrays at once and then freeing them, as a network call does with its
# activations; prints the minor page faults of each call.
CALLS = """
import json, resource, sys
sys.path.insert(0, {root!r})
import numpy as np
from pointseg.cpu_memory import keep_freed_memory
applied = keep_freed_memory({mib})
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    live = [np.ones(4 << 20, np.float32) for _ in range(3)]
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del live
print(json.dumps({{"applied": applied, "faults": faults}}))
"""


def _calls(mib: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CALLS.format(root=str(ROOT), mib=mib)], capture_output=True,
                         text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc thresholds")
def test_kept_memory_is_reused_without_page_faults_and_glibc_defaults_fault_again():
    default, kept = _calls(0), _calls(512)
    assert default["applied"] is False and kept["applied"] is True
    first = kept["faults"][0]
    assert first > 100  # the first call maps and touches its 48 MiB
    # the oracle: with glibc's defaults the heap top above the trim threshold goes back to the OS after each call,
    # so every later call faults again on part of its arrays ...
    assert min(default["faults"][1:]) > 0.25 * default["faults"][0], default
    # ... and with the setting the freed arrays are reused as they are
    assert max(kept["faults"][1:]) < 0.05 * first, kept


def test_bad_size_is_an_error():
    from pointseg.cpu_memory import keep_freed_memory

    for bad in (-1, 2048):  # 2048 MiB would overflow mallopt's int of bytes
        with pytest.raises(ValueError, match=r"mib must be in 0\.\.2047"):
            keep_freed_memory(bad)
    assert keep_freed_memory(0) is False


def test_the_labelling_stage_applies_the_configured_setting(tmp_path, monkeypatch):
    import operators.pseudo_label as stage
    from conftest import label_run

    seen = []
    monkeypatch.setattr(stage, "keep_freed_memory", seen.append)
    label_run(str(tmp_path), num_images=2, size=48)  # the default config, labelled in this process
    assert seen == [512]
