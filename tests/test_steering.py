"""Steering stages: a new one is one class and one line, and the captioner runs it with the others."""

import pytest
from conftest import make_images

from capcli import steering
from capcli.data.images import open_image
from capcli.model.pipeline import Captioner


@pytest.fixture
def registered_stages():
    """STAGES, put back as shipped after the test whatever it registers."""
    shipped = list(steering.STAGES)
    yield steering.STAGES
    steering.STAGES[:] = shipped


def test_a_new_stage_is_one_class_and_one_line(tiny_model, tmp_path, registered_stages):
    images = [open_image(p) for p in make_images(tmp_path, 2)]
    before = Captioner.load(tiny_model, device="cpu").caption(images, beams=2, max_new_tokens=6)
    words = sorted({w.strip(".,").lower() for caption in before for w in caption.split()})

    @steering.register
    class NeverTheseWords(steering.Stage):
        def prepare(self, captioner, facts, settings):
            for image in facts:
                image.banned += words

    after = Captioner.load(tiny_model, device="cpu").caption(images, beams=2, max_new_tokens=6)
    assert registered_stages[-1] is NeverTheseWords
    assert all(after) and not {w.strip(".,").lower() for caption in after for w in caption.split()} & set(words)


def test_the_shipped_stages_run_in_order_prompt_then_bans_then_retry_then_vote():
    assert [stage.__name__ for stage in steering.STAGES] == ["PromptLabels", "ForbidAbsent", "BanWords",
                                                             "RetryEmpty", "MemoryVote"]


def test_the_stage_in_the_architecture_doc_runs_as_written(tiny_model, tmp_path, registered_stages):
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    [example] = re.findall(r"```python\n(.*?)```", doc, re.S)
    namespace = {}
    exec(example, namespace)
    assert registered_stages[-1] is namespace["OnlySeenColours"]
    images = [open_image(p) for p in make_images(tmp_path, 3)]
    captions = Captioner.load(tiny_model, device="cpu").caption(images, beams=2, max_new_tokens=6)
    words = {w.strip(".,").lower() for caption in captions for w in caption.split()}
    assert all(captions) and not words & set(namespace["COLOURS"])  # the tiny model reads no labels
