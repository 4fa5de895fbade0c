"""Captions as people write them, in every output."""

from capcli.text import tidy


def test_tokenized_punctuation_is_joined_and_the_first_letter_capital():
    assert tidy("a cat is playing with a toy .") == "A cat is playing with a toy."
    assert tidy("A man , a woman and a dog 's ball .") == "A man, a woman and a dog's ball."
    assert tidy("two  dogs ( black ) run !") == "Two dogs (black) run!"
    assert tidy("It is n't here .") == "It isn't here."
    assert tidy("Already tidy.") == "Already tidy."
