"""Check, and repair where Tune would silently restart, a Tune experiment's saved state before ``Tuner.restore``.

Ray Tune 2.60 writes its state into a staging folder and then *copies* it to the
experiment folder, file by file and not atomically. A driver killed during that copy
leaves a truncated ``experiment_state-*.json`` or ``basic-variant-state-*.json``
(the search algorithm's pickle). ``Tuner.restore`` then logs "Failed to restore the
run state", starts over with an empty searcher and reports success: the finished
trials vanish from the results and the sweep's settings are not run.

:func:`check_experiment_state` runs before the restore:

- an unreadable file is replaced by the driver's staged copy when this node still has
  it (Tune stages both files, then copies them: a kill during the copy leaves the
  staged pair complete);
- else the experiment state (the trials, their configs and statuses) must parse, or
  the sweep stops with an error naming the file and what to do;
- else an unreadable searcher state is rebuilt from the trials in the experiment state and
  the sweep's space: a ``BasicVariantGenerator`` that hands out the trials still to
  create (:func:`missing_configs`) and counts the unfinished ones against
  ``max_concurrent_trials``. The unreadable file is kept as ``<name>.unreadable``.
"""

from __future__ import annotations

import fnmatch
import glob
import itertools
import json
import logging
import os
import posixpath
from collections import Counter
from typing import Any

from pointseg.storage import write_atomic
from pointseg.tuning import build_search_space, parse_space, swept_params

log = logging.getLogger(__name__)

EXPERIMENT_STATE = "experiment_state-*.json"  # TuneController.CKPT_FILE_TMPL
SEARCHER_STATE = "basic-variant-state-*.json"  # BasicVariantGenerator.CKPT_FILE_TMPL (a cloudpickle)


class TuneStateError(RuntimeError):
    """The saved state of an interrupted sweep cannot be resumed safely."""


def _newest(fs, path: str, pattern: str) -> str | None:
    """The file Tune reads: the greatest name matching ``pattern`` (Tune names them by session time)."""
    names = [posixpath.basename(p) for p in fs.ls(path, detail=False)]
    matching = fnmatch.filter(names, pattern)
    return posixpath.join(path, max(matching)) if matching else None


def _trial_data(fs, state_file: str) -> list:
    """``[trial JSON, run metadata JSON]`` per trial of an experiment state file; :class:`TuneStateError` if unreadable."""
    try:
        with fs.open(state_file, "rb") as f:
            trial_data = json.loads(f.read())["trial_data"]
        for meta, _ in trial_data:
            json.loads(meta)["trial_id"]
        return trial_data
    except (ValueError, KeyError, TypeError) as e:
        raise TuneStateError(
            f"the sweep's saved state {state_file} is unreadable ({type(e).__name__}: {e}); the driver was probably "
            f"killed while Ray Tune copied it. The finished trials' results stay in {posixpath.dirname(state_file)}"
            f"/*/result.json. To start the sweep again pass name=<new name> or another --output"
        ) from e


def _loads(fs, path: str):
    import ray.cloudpickle as cloudpickle

    with fs.open(path, "rb") as f:
        return cloudpickle.loads(f.read())


def missing_configs(space: dict[str, Any], num_samples: int, configs: list[dict]) -> list[dict]:
    """The configs a sweep over ``space`` had still to create, given the ``configs`` of the trials it created.

    Tune creates ``num_samples`` trials for each combination of the grid values; a
    combination short of trials gets new ones, with random parameters drawn afresh
    (those a lost searcher would have drawn are unknowable) and constants as given.
    """
    ps = build_search_space(space)
    kinds = parse_space(space)
    grid = [n for n, (kind, _) in kinds.items() if kind == "grid"]
    def key(values) -> str:  # grid values may be lists or dicts (unhashable); a trial's config went through JSON
        return json.dumps(list(values), sort_keys=True)

    have = Counter(key(c.get(n) for n in grid) for c in configs)
    out = []
    for combo in itertools.product(*(kinds[n][1] for n in grid)):
        for _ in range(max(num_samples - have[key(combo)], 0)):
            config = {n: ps[n].sample() if kinds[n][0] in ("choice", "uniform", "loguniform") else ps[n]
                      for n in kinds if n not in grid}
            out.append({**config, **dict(zip(grid, combo))})
    return out


class RemainingTrials:
    """Hands out the trials a lost searcher state had still to create, as one of ``BasicVariantGenerator``'s iterators.

    Each trial is a copy of a ``template`` trial of the same sweep (its trainable,
    resources, storage and checkpoint settings) with its own id, config and tag, and no
    results. It is pickled inside the searcher's state like Tune's own iterators, so a
    sweep killed again resumes with the trials still left.
    """

    lazy_eval = False  # BasicVariantGenerator.get_state refuses lazily evaluated iterators

    def __init__(self, template: list[str], trials: list[dict]):
        self.template = template  # [trial JSON state, run metadata JSON] from the experiment state
        self.trials = list(trials)  # {"trial_id", "config", "evaluated_params", "experiment_tag"}

    def __iter__(self):
        return self

    def __next__(self):
        from ray.tune.experiment import Trial
        from ray.tune.trainable.metadata import _TrainingRunMetadata

        if not self.trials:
            raise StopIteration
        new = self.trials.pop(0)
        trial = Trial.from_json_state(self.template[0])
        trial.restore_run_metadata(self.template[1])
        manager = trial.run_metadata.checkpoint_manager
        trial.run_metadata = _TrainingRunMetadata()  # no results, checkpoints or failures
        trial.run_metadata.checkpoint_manager = type(manager)(checkpoint_config=manager.checkpoint_config)
        trial.trial_id, trial.config = new["trial_id"], new["config"]
        trial._Trial__unresolved_config = new["config"]
        trial.evaluated_params, trial.experiment_tag = new["evaluated_params"], new["experiment_tag"]
        trial.status, trial.relative_logdir, trial.custom_dirname = Trial.PENDING, None, None
        trial.restore_path, trial._restore_checkpoint_result = None, None
        if trial.trial_dirname_creator:
            trial.custom_dirname = trial.trial_dirname_creator(trial)
        trial.invalidate_json_state()
        return trial


def rebuilt_searcher_state(trial_data: list, space: dict[str, Any], num_samples: int) -> tuple[dict, int]:
    """A ``BasicVariantGenerator`` state that goes on from the trials in ``trial_data``: ``(state, new trials)``."""
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.variant_generator import format_vars

    metas = [json.loads(meta) for meta, _ in trial_data]
    ids = [m["trial_id"] for m in metas]
    prefixes = {t.rsplit("_", 1)[0] + "_" for t in ids if "_" in t}
    prefix = prefixes.pop() if len(prefixes) == 1 else BasicVariantGenerator()._uuid_prefix
    swept = swept_params(space)
    start = max((int(t.rsplit("_", 1)[1]) + 1 for t in ids if t.rsplit("_", 1)[-1].isdigit()), default=len(ids))
    new = []
    for i, config in enumerate(missing_configs(space, num_samples, [m.get("config") or {} for m in metas]), start):
        evaluated = {n: config[n] for n in swept}
        new.append({"trial_id": f"{prefix}{i:05d}", "config": config, "evaluated_params": evaluated,
                    "experiment_tag": f"{i}_{format_vars({(n,): v for n, v in evaluated.items()})}"})
    state = BasicVariantGenerator().get_state()
    del state["max_concurrent"]  # keep the restored Tuner's max_concurrent_trials
    state.update(_iterators=[RemainingTrials(list(trial_data[0]), new)] if new else [],
                 _finished=not new, _uuid_prefix=prefix, _total_samples=len(ids) + len(new),
                 # trials that will run again count against max_concurrent_trials, as they did before the kill
                 _live_trials={m["trial_id"] for m in metas if m.get("status") not in ("TERMINATED", "ERROR")})
    return state, len(new)


def staging_roots() -> list[str]:
    """Ray's per-session artifact folders on this node, where Tune stages a driver's state before copying it."""
    import ray

    if not ray.is_initialized():
        return []
    from ray.train.constants import _get_ray_train_session_dir

    sessions = os.path.dirname(os.path.dirname(_get_ray_train_session_dir()))
    return sorted(glob.glob(os.path.join(sessions, "session_*", "artifacts")))


def _readable(fs, path: str, load) -> bool:
    try:
        load(fs, path)
        return True
    except Exception:  # EOFError, UnpicklingError, JSONDecodeError, ...: a truncated copy
        return False


def _staged_pair(roots: list[str], exp_name: str, session: str) -> tuple[str, str] | None:
    """The driver's staged experiment and searcher state of ``session``, both readable, if this node still has them."""
    import fsspec

    local = fsspec.filesystem("file")
    names = (EXPERIMENT_STATE.replace("*", session), SEARCHER_STATE.replace("*", session))
    for root in roots:
        for staging in glob.glob(os.path.join(root, "*", exp_name, "driver_artifacts")):
            pair = tuple(os.path.join(staging, n) for n in names)
            if _readable(local, pair[0], _load_json) and _readable(local, pair[1], _loads):
                return pair
    return None


def _load_json(fs, path: str):
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def _replace(fs, path: str, data: bytes) -> None:
    """Write ``data`` to ``path``, keeping an existing file as ``<path>.unreadable``."""
    if fs.exists(path):
        fs.mv(path, path + ".unreadable")
    write_atomic(fs.unstrip_protocol(path), data)


def check_experiment_state(exp_dir: str, space: dict[str, Any], num_samples: int,
                           roots: list[str] | None = None) -> str | None:
    """Validate the saved state of the sweep in ``exp_dir``; repair it where Tune would restart silently.

    ``space`` and ``num_samples`` are the sweep's (unchanged since it started: the
    sweep fingerprint is checked first); ``roots`` are where to look for the driver's
    staged state (default: this node's Ray sessions, :func:`staging_roots`).

    1. Both files readable: nothing to do (None).
    2. Either unreadable and this node still has the driver's staged pair of that
       session (complete: the kill hit the copy, not the staging write): the pair is
       copied in.
    3. Only the searcher state unreadable: it is rebuilt (:func:`rebuilt_searcher_state`).
    4. The trial list unreadable and not staged: :class:`TuneStateError`.

    Returns a message describing the repair; unreadable files are kept as ``<name>.unreadable``.
    """
    import fsspec
    import ray.cloudpickle as cloudpickle

    fs, path = fsspec.core.url_to_fs(exp_dir)
    if not fs.exists(path):
        return None
    state_file = _newest(fs, path, EXPERIMENT_STATE)
    if state_file is None:
        return None  # nothing to restore: Tune starts a new sweep
    searcher_file = _newest(fs, path, SEARCHER_STATE)  # None: Tune keeps none for huge grids
    state_ok = _readable(fs, state_file, _load_json)
    if state_ok and (searcher_file is None or _readable(fs, searcher_file, _loads)):
        return None
    name = posixpath.basename(state_file)
    session = name[len("experiment_state-"):-len(".json")]
    staged = _staged_pair(staging_roots() if roots is None else roots, posixpath.basename(path), session)
    if staged is not None:
        for src in staged:
            with open(src, "rb") as f:
                _replace(fs, posixpath.join(path, os.path.basename(src)), f.read())
        message = (f"the sweep's saved state in {path} was unreadable (the driver was probably killed while Ray Tune "
                   f"copied it); the driver's staged copy of session {session} was complete and was copied in "
                   f"from {os.path.dirname(staged[0])}; unreadable files are kept as <name>.unreadable")
    else:
        trial_data = _trial_data(fs, state_file)  # raises TuneStateError when unreadable
        if not trial_data:
            return None
        state, num_new = rebuilt_searcher_state(trial_data, space, num_samples)
        _replace(fs, searcher_file, cloudpickle.dumps(state))
        message = (f"the sweep's search state {posixpath.basename(searcher_file)} was unreadable (the driver was "
                   f"probably killed while Ray Tune copied it). It was rebuilt from the {len(trial_data)} trials in "
                   f"{name} and the sweep's space: {num_new} trial(s) still to create; the unreadable copy is kept "
                   f"as <name>.unreadable")
    log.warning(message)
    return message
