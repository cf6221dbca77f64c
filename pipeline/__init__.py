"""Show, Attend and Tell (Xu et al. 2015): feature pipeline, attention decoder, beam search.

``from pipeline import Captioner`` gives the Python API (:mod:`pipeline.captioner`); it is
imported on first use, so that the command line starts without loading torch.
"""

__all__ = ["Captioner"]


def __getattr__(name: str):
    if name == "Captioner":
        from .captioner import Captioner

        return Captioner
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
