"""Labels: the ImageNet class -> everyday noun map, nouns found in captions, swaps, and the object metrics."""

import random

import pytest
import torch

from capcli.steering.labels import Labeler, class_nouns, find_nouns, plural, swap_noun, vocabulary
from capcli.steering.objects import object_metrics, objects_in


def test_every_imagenet_class_has_a_row_and_a_sample_is_right():
    nouns = class_nouns()
    assert len(nouns) == 1000
    expected = {151: "dog", 207: "dog", 268: "dog", 281: "cat", 282: "cat", 283: "cat", 284: "cat", 285: "cat",
                383: "lemur",  # "Madagascar cat" is a lemur, not a cat
                504: "cup", 967: "coffee", 968: "cup", 657: "rocket", 812: "rocket", 404: "airplane",
                517: None,  # "crane" (the machine) fires on airliners: too ambiguous to name
                134: "bird",  # "crane" the bird
                21: "bird",  # "kite" the bird, not the toy
                339: "horse", 671: "bicycle", 937: "broccoli", 963: "pizza", 978: "beach", 726: None}
    assert {index: nouns[index] for index in expected} == expected
    assert "dog" in vocabulary() and "cat" in vocabulary() and None not in vocabulary()


def test_labeler_sums_class_probabilities_per_noun():
    logits = torch.full((1, 1000), -20.0)
    logits[0, [281, 282, 285]] = 0.0  # three cat classes share the probability
    logits[0, 504] = 0.0  # coffee mug
    [labels] = Labeler()(logits)
    assert labels[0][0] == "cat" and abs(labels[0][1] - 0.75) < 1e-3
    assert labels[1][0] == "cup" and abs(labels[1][1] - 0.25) < 1e-3


def test_nouns_in_captions_take_the_longest_phrase_and_plurals_and_synonyms():
    found = [(m.noun, m.plural) for m in find_nouns("Two puppies chase a hot dog and a ball near the sofa .")]
    assert found == [("dog", True), ("hot dog", False), ("ball", False), ("couch", False)]
    assert plural("bus") == "buses" and plural("puppy") == "puppies" and plural("sheep") == "sheep"


def test_a_swap_replaces_a_noun_of_one_kind_in_the_caption_with_its_article():
    caption = "A dog runs after two dogs ."
    new, swapped = swap_noun(caption, find_nouns(caption), random.Random(3))
    [(old, replacement)] = swapped.items()
    assert old == "dog" and replacement != "dog"
    article = "An" if replacement[0] in "aeiou" else "A"
    assert new == f"{article} {replacement} runs after two {plural(replacement)} ."


def test_object_metrics_count_wrong_and_missed_objects():
    refs = {"a": ["A cat on a sofa .", "A cat sleeping on a couch .", "A kitten on the sofa .", "A cat .", "A pet ."],
            "b": ["A man riding a horse .", "A person on a horse .", "A rider .", "A horse .", "A field ."]}
    preds = {"a": "A dog on a sofa .", "b": "A man riding a horse on a tennis court ."}
    summary, per_image = object_metrics(preds, refs)
    assert per_image["a"] == {"objects": ["dog", "couch"], "wrong_objects": ["dog"], "missed_objects": ["cat"]}
    assert per_image["b"]["wrong_objects"] == [] and per_image["b"]["missed_objects"] == []
    assert summary["CHAIR_s"] == 0.5 and summary["CHAIR_i"] == pytest.approx(1 / 4)
    assert summary["recall"] == pytest.approx(3 / 4)  # cat, couch | person, horse: cat missed
    assert objects_in("A baseball player swings a bat on the baseball field .") == ["person", "baseball bat"]
