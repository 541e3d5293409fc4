"""Ray Data actor pools under the pipeline's timeouts: a hang or an actor that never starts is an error.

:func:`set_timeouts` copies ``ray_data.no_progress_timeout_s`` and
``ray_data.wait_for_min_actors_s`` into Ray Data's context (call it before the
dataset is built); :func:`actor_batches` iterates the pool's output and turns
Ray's "Timed out while starting actors" into an error that names the key to
raise (actors that load trained networks on a busy machine can take minutes).
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["actor_batches", "set_timeouts"]


def set_timeouts(rd) -> None:
    """Ray Data's no-progress and actor-start timeouts from the ``ray_data`` config ``rd``."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_no_progress_timeout_s = rd.no_progress_timeout_s  # a hang becomes an error
    ctx.wait_for_min_actors_s = rd.wait_for_min_actors_s


def actor_batches(ds, rd, what: str) -> Iterator[dict]:
    """``ds.iter_batches`` (whole blocks, numpy); an actor pool that does not start within
    ``rd.wait_for_min_actors_s`` raises a RuntimeError naming ``what`` and the key."""
    import ray

    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    except ray.exceptions.GetTimeoutError as e:
        if "starting actors" not in str(e):
            raise
        raise RuntimeError(
            f"{what}: the actors did not start within ray_data.wait_for_min_actors_s={rd.wait_for_min_actors_s:g} s "
            "(an actor builds its model in its constructor; trained networks on a busy machine take longer): "
            "raise ray_data.wait_for_min_actors_s, or free CPUs") from e
