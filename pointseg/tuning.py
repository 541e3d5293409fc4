"""Hyperparameter sweeps of pseudo-label generators: search spaces, sweep config, results.

A sweep asks which generator settings give the best pseudo labels on a small
densely-labelled validation subset (the user labels a few images fully; Tune
picks the settings for the rest). The objective of a trial with parameters
``theta`` is

    score(theta) = PQ( G_theta(images, points), ground truth )     (or PQ_th, mIoU, ...)

over the subset, maximised (``mode: max``) over the declared search space.

The search space is YAML, one entry per generator parameter (``generator.params``
of the base config); a key ``train.<field>`` sweeps the stage-1 config of a
trainable generator (``generator.train``, e.g. EPLD's layer count). Each trial
of a trainable generator trains its stage 1 on every image's points (pseudo
labels are a product for the training set) in the trial's process
(:func:`pointseg.train.engine.fit_plain`, one CPU share), stopping at
``trial_budget_s`` of wall time, then labels and scores the subset::

    space:
      beta: {grid: [0.01, 0.1, 1.0]}        # every value (Cartesian product with other grids)
      downscale: {choice: [0.25, 0.5]}      # one value drawn per sample
      eps: {uniform: [0.01, 0.2]}           # U(lo, hi)
      tau: {loguniform: [1e-3, 1e-1]}       # log-uniform on [lo, hi]
      blur_sigma: 0.5                       # a constant

Grid entries multiply, ``num_samples`` repeats the whole grid with fresh
draws of the random entries (Ray Tune semantics).

With ``objective: stage2`` the sweep asks instead which stage-2 training
settings give the best model: the pseudo labels are made once, each trial
trains on them with its own ``train.*`` settings (``space`` keys are pipeline
config paths such as ``train.params.decoder_layers`` or ``train.lr``) and
scores the trained model's PQ on the held-out images (every
``train.val_every``-th image, never trained on)::

    score(theta) = PQ( f_theta(validation images), ground truth ),   f_theta = stage 2 trained with theta

ASHA (Li et al., "A System for Massively Parallel Hyperparameter Tuning",
MLSys 2020) stops a trial at rung ``r_k = grace_period * eta^k`` reports when
its training loss there is worse than the ``1 - 1/eta`` quantile of the
losses other trials had at ``r_k`` (``eta`` = ``reduction_factor``).

This module needs no Ray at import; :func:`build_search_space` imports
``ray.tune`` when called. The sweep itself is ``flows/tune_sweep.py``.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from pointseg.config import PipelineConfig, Strict, deep_merge, parse_overrides, read_yaml, validate
from pointseg.data.prepare import join, open_out
from pointseg.generators import generator_class
from pointseg.train.final_loss import final_loss  # noqa: F401  (part of this module's API)

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform")
METRICS = ("pq", "sq", "rq", "pq_th", "sq_th", "rq_th", "pq_st", "sq_st", "rq_st", "miou")

#: Stage-2 settings a trial may not change: they decide which images are held out or what the
#: training labels are, so trials with different values would be scored on different things.
STAGE2_FIXED = ("train.enabled", "train.supervision", "train.point_radius", "train.val_every",
                "train.storage_path", "train.run_name", "train.model")
#: Prefix of a pseudo-label space key that sweeps the generator's stage-1 config.
STAGE1_PREFIX = "train."


class AshaConfig(Strict):
    """ASHA early stopping (``scheduler: asha``), counted in reports (``training_iteration``).

    ``metric``/``mode``: what ASHA compares at each rung. For ``objective: stage2``
    (default ``loss``, ``min``) it must be something every training report holds:
    ``loss`` (Mask2Former: summed over every decoder layer's auxiliary loss, so it
    grows with ``decoder_layers``) or ``final_loss`` (the last layer's loss only;
    comparable across decoder layer counts). For ``pseudo_label`` the default is
    the sweep's ``metric``/``mode``. ``max_t``: default the most reports a trial
    makes, plus one for the final PQ.
    """

    metric: str | None = None
    mode: Literal["max", "min"] | None = None
    grace_period: int = Field(1, ge=1, description="reports before a trial can be stopped")
    reduction_factor: float = Field(3.0, gt=1, description="eta: keep the best 1/eta at each rung")
    max_t: int | None = Field(None, ge=1)


class TuneConfig(Strict):
    """A sweep: which generator, over which space, scored how, with which resources.

    ``base_config`` is the pipeline YAML (:class:`~pointseg.config.PipelineConfig`)
    that supplies the dataset, points and Ray settings; ``base_overrides`` are
    ``key.path=value`` overrides applied to it (e.g. a smaller validation set).
    """

    base_config: str = "configs/full_pipeline.yaml"
    base_overrides: list[str] = Field(default_factory=list)
    output: str = "out/tune"
    method: str = "psps"
    space: dict[str, Any] = Field(default_factory=dict, description="generator parameter -> {grid|choice|uniform|loguniform: ...} or constant")
    objective: Literal["pseudo_label", "stage2"] = "pseudo_label"
    metric: Literal[METRICS] = "pq"  # type: ignore[valid-type]
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(1, ge=1, description="repeats of the grid; draws of the random entries")
    max_concurrent_trials: int = Field(2, ge=1)
    cpus_per_trial: float = Field(0.25, gt=0, description="fractional: two 1-CPU trial drivers deadlock a 2-core box")
    subset: int | None = Field(None, ge=1, description="score on the first N images with ground truth (None: all)")
    name: str | None = Field(None, description="experiment name; default tune_<method>")
    storage_path: str | None = Field(None, description="Tune experiment root; default OUTPUT/tune/ray_results")
    scheduler: Literal["asha"] | None = Field(None, description="asha: early stopping, for objectives that report repeatedly (stage2)")
    asha: AshaConfig = AshaConfig()
    trial_budget_s: float | None = Field(
        300.0, gt=0, description="pseudo_label trials of a trainable generator: wall seconds of stage-1 training "
        "per trial (it stops there and labels with what it learned); null: train generator.train.steps")
    max_wall_s: float | None = Field(None, gt=0, description="time budget of the whole sweep (Tune time_budget_s)")

    @model_validator(mode="after")
    def _space_parses(self) -> "TuneConfig":
        parse_space(self.space)
        if self.objective == "stage2":
            for name in self.space:
                if not name.startswith("train."):
                    raise ValueError(f"space.{name}: objective stage2 sweeps stage-2 settings; keys are pipeline "
                                     f"config paths under train. (e.g. train.{name})")
                if any(name == k or name.startswith(k + ".") for k in STAGE2_FIXED):
                    raise ValueError(f"space.{name}: fixed for a stage-2 sweep (it changes the held-out images or "
                                     f"the training labels); set it in base_config or base_overrides")
            if self.subset is not None:
                raise ValueError("subset: not used by objective stage2 (the held-out images are every "
                                 "train.val_every-th image); shrink the dataset with base_overrides instead")
        return self

    @property
    def experiment_name(self) -> str:
        return self.name or (f"tune_stage2_{self.method}" if self.objective == "stage2" else f"tune_{self.method}")


# --------------------------------------------------------------------------- search space


def parse_space(space: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """Validate a YAML search space into ``{param: (kind, values)}``.

    ``kind`` is one of ``grid``, ``choice``, ``uniform``, ``loguniform`` or
    ``const``. Raises ``ValueError`` naming ``space.<param>`` on a bad entry.
    """
    if not isinstance(space, dict):
        raise ValueError(f"space: must be a mapping of parameter -> spec, got {type(space).__name__}")
    out: dict[str, tuple[str, Any]] = {}
    for name, spec in space.items():
        where = f"space.{name}"
        if not isinstance(spec, dict):
            out[name] = ("const", spec)
            continue
        if len(spec) != 1:
            raise ValueError(f"{where}: a spec has exactly one key of {list(SPACE_KINDS)}, got {sorted(spec)}")
        kind, values = next(iter(spec.items()))
        if kind not in SPACE_KINDS:
            raise ValueError(f"{where}: unknown kind {kind!r}; expected one of {list(SPACE_KINDS)}")
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}.{kind}: expected a non-empty list, got {values!r}")
        if kind in ("uniform", "loguniform"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ValueError(f"{where}.{kind}: expected [lo, hi] numbers, got {values!r}")
            lo, hi = float(values[0]), float(values[1])
            if not lo < hi:
                raise ValueError(f"{where}.{kind}: need lo < hi, got {values!r}")
            if kind == "loguniform" and lo <= 0:
                raise ValueError(f"{where}.loguniform: need lo > 0, got {values!r}")
            values = [lo, hi]
        out[name] = (kind, values)
    return out


def build_search_space(space: dict[str, Any]) -> dict[str, Any]:
    """The Ray Tune ``param_space`` of a YAML space (see :func:`parse_space`)."""
    from ray import tune

    make = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "const": lambda v: v,
    }
    return {name: make[kind](values) for name, (kind, values) in parse_space(space).items()}


def swept_params(space: dict[str, Any]) -> list[str]:
    """Names of the parameters that vary (everything but constants), in YAML order."""
    return [n for n, (kind, _) in parse_space(space).items() if kind != "const"]


def num_trials(space: dict[str, Any], num_samples: int = 1) -> int:
    """Trials Tune will run: product of the grid sizes times ``num_samples``."""
    n = num_samples
    for kind, values in parse_space(space).values():
        if kind == "grid":
            n *= len(values)
    return n


def check_space_against(config_model, space: dict[str, Any], base_params: dict | None = None,
                        train_model=None, base_train: dict | None = None) -> None:
    """Validate each value the space can take against a generator's config model (and, for
    ``train.*`` keys, its stage-1 config model).

    Every grid/choice value and both ends of every range are checked one at a
    time (other parameters at their first value), so a typo in a parameter
    name or an out-of-range value fails before any trial starts, naming
    ``space.<param>``.
    """
    parsed = parse_space(space)
    first = {n: values[0] if kind != "const" else values for n, (kind, values) in parsed.items()}
    for name, (kind, values) in parsed.items():
        for v in [values] if kind == "const" else values:
            params, train = split_sampled({**first, name: v})
            try:
                config_model.model_validate({**(base_params or {}), **params})
                if train:
                    if train_model is None:
                        raise ValueError("the generator has no stage 1 (train.* keys sweep its stage-1 config)")
                    train_model.model_validate({**(base_train or {}), **train})
            except Exception as exc:  # pydantic.ValidationError
                raise ValueError(f"space.{name}: value {v!r} is not valid: {exc}") from None


def split_sampled(sampled: dict) -> tuple[dict, dict]:
    """``(generator params, stage-1 config)`` parts of a sampled point (``train.*`` keys go to the second)."""
    params = {k: v for k, v in sampled.items() if not k.startswith(STAGE1_PREFIX)}
    train = {k[len(STAGE1_PREFIX):]: v for k, v in sampled.items() if k.startswith(STAGE1_PREFIX)}
    return _plain(params), _plain(train)


# --------------------------------------------------------------------------- configs


def load_base_config(tcfg: TuneConfig, base_path: str | None = None) -> PipelineConfig:
    """The pipeline config of the sweep: ``base_config`` (or ``base_path``) with ``base_overrides``."""
    path = base_path or tcfg.base_config
    data = deep_merge(read_yaml(path), parse_overrides(tcfg.base_overrides))
    return validate(PipelineConfig, data, source=path)


def trial_params(base: PipelineConfig, method: str, sampled: dict) -> dict:
    """Generator parameters of one trial: the base config's (if same method) updated by the sampled ones."""
    params = base.generator.params.model_dump(mode="json") if base.generator.method == method else {}
    params.update(split_sampled(sampled)[0])
    return params


def trial_train(base: PipelineConfig, method: str, sampled: dict) -> dict | None:
    """Stage-1 config of one trial (None for a generator without stage 1)."""
    if generator_class(method).stage1 is None:
        return None
    train = base.generator.train.model_dump(mode="json") if base.generator.method == method and base.generator.train else {}
    train.update(split_sampled(sampled)[1])
    return train


def best_pipeline_config(base: PipelineConfig, method: str, params: dict, train: dict | None = None) -> PipelineConfig:
    """The base pipeline config with ``generator`` replaced by the winner's method, params and stage-1 config."""
    data = base.model_dump(mode="json")
    data["generator"] = {"method": method, "params": _plain(params), **({"train": _plain(train)} if train else {})}
    return validate(PipelineConfig, data, source="best config")


def write_best_config(uri: str, cfg: PipelineConfig, header: str = "") -> None:
    """Write a pipeline config as YAML that ``flows/full_pipeline.py --config`` reads back."""
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False)
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    with open_out(uri, "w") as f:
        f.write(comment + text)


def _nest(dotted: str, value) -> dict:
    """``"a.b.c", v`` -> ``{"a": {"b": {"c": v}}}``."""
    out: dict = value
    for key in reversed(dotted.split(".")):
        out = {key: out}
    return out


def stage2_base_config(base: PipelineConfig, method: str) -> PipelineConfig:
    """The base config of a stage-2 sweep: generator ``method`` (base params if same method), training on."""
    data = base.model_dump(mode="json")
    train = trial_train(base, method, {})
    data["generator"] = {"method": method, "params": trial_params(base, method, {}), **({"train": train} if train else {})}
    data["train"]["enabled"] = True
    return validate(PipelineConfig, data, source="stage-2 sweep base config")


def stage2_trial_config(base: PipelineConfig, sampled: dict) -> PipelineConfig:
    """The pipeline config of one stage-2 trial: ``base`` with each ``train.*`` key of ``sampled`` set.

    Raises ``ValueError`` naming ``space.<key>`` when the value is not valid there.
    """
    data = base.model_dump(mode="json")
    for name, value in _plain(sampled).items():
        data = deep_merge(data, _nest(name, value))
        try:
            validate(PipelineConfig, data, source="stage-2 trial config")
        except ValueError as exc:
            raise ValueError(f"space.{name}: value {value!r} is not valid: {exc}") from None
    return validate(PipelineConfig, data, source="stage-2 trial config")


def check_stage2_space(base: PipelineConfig, space: dict[str, Any]) -> None:
    """Validate each value a stage-2 space can take (others at their first value), before any trial."""
    parsed = parse_space(space)
    first = {n: values[0] if kind != "const" else values for n, (kind, values) in parsed.items()}
    for name, (kind, values) in parsed.items():
        for v in [values] if kind == "const" else values:
            stage2_trial_config(base, {**first, name: v})


def stage2_max_reports(base: PipelineConfig, space: dict[str, Any]) -> int:
    """Most training reports a stage-2 trial makes: ``ceil(steps / checkpoint_every)`` over the space.

    The training loop (``pointseg/train/ray_loop.py``) reports at every
    ``checkpoint_every``-th step and at the last step.
    """
    parsed = parse_space(space)

    def candidates(key: str, default: int) -> list[int]:
        kind, values = parsed.get(f"train.{key}", ("const", default))
        return [int(v) for v in ([values] if kind == "const" else values)]

    return max(-(-s // c) for s in candidates("steps", base.train.steps)
               for c in candidates("checkpoint_every", base.train.checkpoint_every))


# --------------------------------------------------------------------------- results


def sort_rows(rows: list[dict], metric: str, mode: str = "max") -> list[dict]:
    """Trials best first; trials without the metric (errored) last."""

    def key(r):
        v = r.get(metric)
        missing = v is None or (isinstance(v, float) and math.isnan(v))
        return (missing, 0.0 if missing else (-v if mode == "max" else v))

    return sorted(rows, key=key)


def table_columns(rows: list[dict], params: list[str], metrics: list[str]) -> list[str]:
    extra = [c for c in ("step", "loss", "final_loss", "num_images", "num_failed", "trial_seconds", "status", "error")
             if any(c in r for r in rows)]
    return ["trial_id", *params, *metrics, *extra]


def rows_to_csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c, "") for c in columns})
    return buf.getvalue()


def rows_to_markdown(rows: list[dict], columns: list[str], metrics: list[str]) -> str:
    """A Markdown table; metrics shown as percentages with one decimal."""

    def cell(c, v):
        if v is None or v == "":
            return "-"
        if c in metrics and isinstance(v, (int, float)):
            return "-" if math.isnan(v) else f"{100 * v:.1f}"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    head = [c + (" (%)" if c in metrics else "") for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _numeric(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_metric_vs_params(rows: list[dict], metric: str, params: list[str], mode: str = "max") -> dict[str, bytes]:
    """PNG plots of ``metric`` against each swept numeric parameter.

    For parameter ``p`` and (if there is one) a second swept parameter ``q``
    with at most 8 values, one line per value of ``q``; every other swept
    parameter is reduced by taking the best score at each point. With
    Point2Mask's ``n_iter`` (T) and ``beta`` this draws the paper's Tables A2
    and A3 as curves. Returns ``{"<metric>_vs_<p>.png": png bytes}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pointseg.viz.curves import figure_png

    ok = [r for r in rows if isinstance(r.get(metric), (int, float)) and not math.isnan(r[metric])]
    best = max if mode == "max" else min
    plots: dict[str, bytes] = {}
    for p in params:
        xs = sorted({r[p] for r in ok if p in r}, key=float) if _numeric([r.get(p) for r in ok]) else []
        if len(xs) < 2:
            continue
        others = [q for q in params if q != p and len({str(r.get(q)) for r in ok}) > 1]
        q = next((q for q in others if len({str(r.get(q)) for r in ok}) <= 8), None)
        groups = sorted({r.get(q) for r in ok}, key=lambda v: (str(type(v)), v)) if q else [None]
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
        for g in groups:
            sel = [r for r in ok if q is None or r.get(q) == g]
            ys = [best([r[metric] for r in sel if r[p] == x], default=float("nan")) for x in xs]
            ax.plot(xs, [100 * y for y in ys], marker="o", label=f"{q}={g}" if q else None)
        if min(xs) > 0 and max(xs) / min(xs) >= 20:
            ax.set_xscale("log")
        ax.set_xlabel(p)
        ax.set_ylabel(f"{metric} (%)")
        reduced = [o for o in others if o != q]
        ax.set_title(f"{metric} vs {p}" + (f" ({mode} over {', '.join(reduced)})" if reduced else ""), fontsize=9)
        ax.grid(alpha=0.3)
        if q:
            ax.legend(fontsize=7)
        plots[f"{metric}_vs_{p}.png"] = figure_png(fig)
    return plots


def write_results(output: str, rows: list[dict], metric: str, mode: str, params: list[str], metrics: list[str]) -> dict[str, str]:
    """Write ``results.csv``, ``results.md`` and the plots under ``output``; returns name -> URI."""
    rows = sort_rows(rows, metric, mode)
    metrics = [metric, *[m for m in metrics if m != metric]]
    cols = table_columns(rows, params, metrics)
    written = {}
    for name, text in (("results.csv", rows_to_csv(rows, cols)), ("results.md", rows_to_markdown(rows, cols, metrics))):
        with open_out(join(output, name), "w") as f:
            f.write(text)
        written[name] = join(output, name)
    for name, png in plot_metric_vs_params(rows, metric, params, mode).items():
        with open_out(join(output, name), "wb") as f:
            f.write(png)
        written[name] = join(output, name)
    return written


def _plain(obj):
    """numpy scalars/containers -> plain Python, for YAML and JSON."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    return obj


def resolve_path(path: str, *roots: Path) -> str:
    """``path`` if it exists (or is a URI or absolute), else the first ``root/path`` that exists."""
    if "://" in path or Path(path).is_absolute() or Path(path).exists():
        return path
    for root in roots:
        if (Path(root) / path).exists():
            return str(Path(root) / path)
    return path
