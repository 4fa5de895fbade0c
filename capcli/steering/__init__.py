"""What steers the words: what the eyes see (detector: COCO objects; labels: the classifier's nouns; objects:
COCO's categories and their words), what a grounded prompt tells (grounding), what is absent (absent),
similar images' captions (memory, scored with cider), and the stages the captioner runs in order (stages).
`from capcli import steering` gives the stages' public names: Stage, STAGES, register, ImageFacts."""

_STAGE_NAMES = ("Stage", "STAGES", "register", "ImageFacts")


def __getattr__(name):  # lazy (PEP 562): importing a word list does not import torch
    if name in _STAGE_NAMES:
        from capcli.steering import stages

        return getattr(stages, name)
    raise AttributeError(f"module 'capcli.steering' has no attribute {name!r}")
