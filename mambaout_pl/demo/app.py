"""The Gradio page of a predictor: upload an image, see its top-5 classes, its coloured label map or its detections.

Gradio is an optional dependency (``pip install -e ".[demo]"``); it is imported when a page is built.
The page is served on this machine only (``127.0.0.1`` unless told otherwise), never shared
through Gradio's tunnel, and Gradio's usage analytics are off unless ``GRADIO_ANALYTICS_ENABLED``
says otherwise.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mambaout_pl.data.images import read_rgb_image
from mambaout_pl.demo.drawing import class_shares, detection_picture, mask_picture
from mambaout_pl.demo.predictor import Classifier, Detector, Predictor, Segmenter

__all__ = ["API_NAME", "build_demo", "import_gradio", "launch_demo", "make_predict"]

#: The endpoint ``gradio_client.Client(url).predict(image, api_name=f"/{API_NAME}")`` calls.
API_NAME = "predict"


def import_gradio() -> Any:
    """``gradio``, with analytics off by default; an ImportError that says how to install it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as error:
        raise ImportError(
            "`mambaout demo` needs Gradio: pip install -e \".[demo]\" (or pip install 'gradio>=4')."
        ) from error
    return gradio


def make_predict(predictor: Predictor, top_k: int = 5, score_threshold: float = 0.5) -> Callable[[str], Any]:
    """The page's function: an image file's path in; out, by the predictor's kind:

    - classification: ``{class name: probability}`` of the ``top_k`` most probable classes;
    - segmentation: the image with its coloured label map and legend (PIL), and ``{class name: share
      of the pixels}``;
    - detection: the image with boxes, labels, scores (and masks) drawn (PIL), and the detections
      scoring at least ``score_threshold`` as ``[{"label", "name", "score", "box"}]`` (``box`` XYXY in pixels).
    """
    if isinstance(predictor, Classifier):

        def classify(path: str) -> dict[str, float]:
            return dict(predictor.top_classes(read_rgb_image(path), top_k))

        return classify
    if isinstance(predictor, Segmenter):

        def segment(path: str) -> tuple[Any, dict[str, float]]:
            image = read_rgb_image(path)
            labels = predictor.label_map(image)
            return mask_picture(image, labels, predictor.label_names), class_shares(labels, predictor.label_names)

        return segment
    if isinstance(predictor, Detector):
        names = predictor.names()

        def detect(path: str) -> tuple[Any, list[dict[str, Any]]]:
            image = read_rgb_image(path)
            objects = predictor.objects(image)
            keep = objects["scores"] >= score_threshold
            found = [
                {"label": label, "name": names.get(label, str(label)), "score": score, "box": box}
                for label, score, box in zip(
                    objects["labels"][keep].tolist(), objects["scores"][keep].tolist(), objects["boxes"][keep].tolist()
                )
            ]
            return detection_picture(image, objects, names, score_threshold), found

        return detect
    raise TypeError(f"No demo page for {type(predictor).__name__}: give a Classifier, Segmenter or Detector.")


def build_demo(predictor: Predictor, top_k: int = 5, score_threshold: float = 0.5) -> Any:
    """A ``gradio.Interface`` around :func:`make_predict`: an image upload in; a ``Label`` of the top classes
    (classification), the label-map picture and a ``Label`` of class shares (segmentation), or the
    detections' picture and their JSON (detection) out."""
    gr = import_gradio()
    predict = make_predict(predictor, top_k, score_threshold)
    if isinstance(predictor, Classifier):
        classes = len(predictor.label_names or []) or top_k
        outputs: list[Any] = [gr.Label(num_top_classes=min(top_k, classes), label=f"top-{top_k} classes")]
        description = f"The {top_k} most probable classes of the image, with their probabilities."
    elif isinstance(predictor, Segmenter):
        outputs = [gr.Image(type="pil", label="label map"), gr.Label(label="share of the pixels")]
        description = "Each pixel coloured by its most probable class; the legend gives each class's share."
    else:
        outputs = [gr.Image(type="pil", label="detections"), gr.JSON(label="objects")]
        description = f"Boxes, labels, scores (and masks) of the objects scoring at least {score_threshold}."
    source = Path(predictor.source)
    title = f"MambaOut {predictor.kind}: {source.parent.name}/{source.name}" if source.parent.name else source.name
    return gr.Interface(
        fn=predict,
        inputs=gr.Image(type="filepath", label="image"),
        outputs=outputs,
        title=title,
        description=description,
        api_name=API_NAME,
        **_no_flagging(gr.Interface),
    )


def launch_demo(
    predictor: Predictor, host: str = "127.0.0.1", port: int = 7860, block: bool = True, **build_options: Any
) -> Any:
    """Serve ``predictor``'s page at ``http://host:port``; with ``block=False`` return the running app
    (stop it with ``app.close()``), else serve until interrupted."""
    demo = build_demo(predictor, **build_options)
    demo.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, inbrowser=False)
    return demo


def _no_flagging(interface: type) -> dict[str, str]:
    """Gradio 5 and later name it ``flagging_mode``, Gradio 4 ``allow_flagging``."""
    parameters = inspect.signature(interface.__init__).parameters
    return {"flagging_mode": "never"} if "flagging_mode" in parameters else {"allow_flagging": "never"}
