"""``mambaout demo``: a Gradio page on this machine for a checkpoint or an export of any of the three tasks.

- :mod:`~mambaout_pl.demo.predictor`: ``load_predictor`` and the ``Classifier``, ``Segmenter``, ``Detector``.
- :mod:`~mambaout_pl.demo.drawing`: the label map with its legend, the detections drawn.
- :mod:`~mambaout_pl.demo.app`: ``build_demo`` and ``launch_demo`` (Gradio is imported there only).
"""

from mambaout_pl.demo.predictor import Classifier, Detector, Predictor, Segmenter, load_predictor

__all__ = ["Classifier", "Detector", "Predictor", "Segmenter", "load_predictor"]
