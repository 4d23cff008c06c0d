"""The training script: ``python -m protoseg_ext.train`` (console script ``protoseg-train``).

* :mod:`protoseg_ext.train.loop` - arguments, the training loop, evaluation, checkpoints;
* :mod:`protoseg_ext.train.model` - the segmentation network around :class:`~protoseg_ext.ProtoSegHead`;
* :mod:`protoseg_ext.train.data` - the datasets (synthetic, Cityscapes, ADE20K) and samplers.

The submodules are imported on first use, so that ``python -m protoseg_ext.train.data``
runs its module once.
"""


def main(argv=None) -> dict:
    """Run the training script with ``argv`` (default: the command line); see ``--help``."""
    from .loop import main as _main

    return _main(argv)


__all__ = ["main"]
