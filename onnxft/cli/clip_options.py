"""The clipped-activation options shared by ``harden`` (and their ClipTrainOptions)."""
from __future__ import annotations

import click

METHODS = ("proact", "hybrid", "layer", "neuron", "ranger")


def clip_options(fn=None, *, method: bool = True):
    """--clip, --clip-mode, --train, --train-limit, --epochs, --penalty (docs/proact.md); without
    --clip (``method=False``) where the scheme names the method (compare)."""
    if fn is None:
        return lambda f: clip_options(f, method=method)
    opts = [
        click.option("--clip", type=click.Choice(METHODS), default=None,
                     help="Clipped activations after ReLU/GELU/SiLU/HardSwish: proact (hybrid thresholds trained "
                          "layer by layer), hybrid (neuron-wise in the last activation layer, trained jointly), "
                          "layer, neuron (trained jointly), or ranger (profiled maxima, no training)."),
        click.option("--clip-mode", type=click.Choice(["zero", "clamp"]), default=None,
                     help="Values above a threshold (and NaN, Inf) become 0, or the bound (default: clamp for "
                          "ranger, zero otherwise)."),
        click.option("--train", default=None,
                     help="Labelled .npz (inputs + 'y') to train clip thresholds on (default: a sample's bundled "
                          "training subset, else --calib)."),
        click.option("--train-limit", default=512, show_default=True, type=click.IntRange(min=1),
                     help="Train on at most this many items."),
        click.option("--epochs", default=3, show_default=True, type=click.IntRange(min=0),
                     help="Passes over the training items per trained block (a layer for proact)."),
        click.option("--penalty", default=0.02, show_default=True, type=click.FloatRange(min=0),
                     help="Weight of the term pulling thresholds down (mean squared threshold / profiled max)."),
    ]
    for opt in reversed(opts if method else opts[1:]):
        fn = opt(fn)
    return fn


def clip_train_options(method, mode, limit, epochs, penalty):
    if method is None:
        return None
    from ..campaigns.train_clip import ClipTrainOptions

    return ClipTrainOptions(method=method, mode=mode, limit=limit, epochs=epochs, penalty=penalty)
