"""The loss ASHA compares across decoder layer counts, in a module that imports nothing heavy.

Ray Train's controller unpickles the sweep's report callback, which calls
:func:`final_loss`: kept free of torch and pydantic configs so that the
controller process does not import them (about 5 CPU-seconds per trial).
"""

from __future__ import annotations


def final_loss(metrics: dict) -> float | None:
    """The loss of the model's final output, comparable across decoder layer counts.

    Mask2Former's ``loss`` is ``sum_{l=1..L} (L_ce^l + L_mask^l + L_dice^l)`` over the
    predictions of its ``L`` decoder layers (the first ``L-1`` as auxiliary
    terms), so it grows about ``L``-fold with ``decoder_layers``; this is the
    last layer's term ``L_ce^L + L_mask^L + L_dice^L`` alone (the keys without a
    layer suffix), the loss of the prediction the model is evaluated on.
    Mask R-CNN has no per-layer terms: its ``loss``. ``None`` without a loss.
    """
    parts = ("loss_cross_entropy", "loss_mask", "loss_dice")
    if all(k in metrics for k in parts):
        return float(sum(metrics[k] for k in parts))
    return None if metrics.get("loss") is None else float(metrics["loss"])
