"""Self-critical sequence training (Rennie et al. 2017, "Self-critical Sequence Training for Image
Captioning"): sample a few captions per image from the mapper's own distribution, reward each with its
CIDEr-D against the image's training references, and raise the likelihood of those that beat the mean of
the image's other samples (the baseline of Luo 2020, "A Better Variant of Self-Critical Sequence
Training"). Only the mapper learns; the LM stays frozen.

An object penalty can be taken off each reward for every COCO object category the caption names that none of
the image's references names (the CHAIR_i errors of capcli.steering.objects), so that naming what is not there costs
more than CIDEr-D's lost n-grams."""

from __future__ import annotations

import torch

from capcli.steering.cider import CiderD
from capcli.steering.objects import objects_in

MAX_SAMPLE_TOKENS = 24  # a sampled caption is cut here (Flickr8k references average 11 words)


class SelfCritical:
    """The reward and the loss of one self-critical step, for a training set's images and references."""

    def __init__(self, references: list[list[str]], samples: int, object_penalty: float = 0.0):
        if samples < 2:
            raise ValueError("self-critical training needs at least 2 samples per image (the baseline is the others' mean)")
        self.references = references  # per image index
        self.samples = samples
        self.cider = CiderD(references)  # document frequencies over the training images
        self.object_penalty = object_penalty
        self._prepared: dict[int, list] = {}
        self._objects: dict[int, set[str]] = {}

    def rewards(self, images: list[int], captions: list[str]) -> torch.Tensor:
        """(len(images), samples) CIDEr-D of each caption (images major) against its image's references, less
        the object penalty for each object it names that they do not."""
        scores = []
        for i, caption in enumerate(captions):
            image = images[i // self.samples]
            score = self.cider.score(caption, self._references(image))
            if self.object_penalty:
                score -= self.object_penalty * len(self.wrong_objects(image, caption))
            scores.append(score)
        return torch.tensor(scores).view(len(images), self.samples)

    def wrong_objects(self, image: int, caption: str) -> list[str]:
        """The COCO object categories the caption names that none of the image's references names."""
        if image not in self._objects:
            self._objects[image] = {o for reference in self.references[image] for o in objects_in(reference)}
        return [o for o in objects_in(caption) if o not in self._objects[image]]

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Each sample's reward minus the mean reward of its image's other samples."""
        others = (rewards.sum(1, keepdim=True) - rewards) / (self.samples - 1)
        return rewards - others

    def loss(self, trained, model, features: torch.Tensor, images: list[int], labels: list[list[str]] | None,
             divisor: float, references: list[list[int]] | None = None,
             xent_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's loss for these images (features (B, D) on the device), divided by `divisor`, and the
        rewards of their samples. With `references` (one caption's ids per image), the loss gains `xent_weight`
        times each reference's summed cross-entropy, per image of the global batch (`divisor` / samples)."""
        context = model.context_ids(labels, len(images))
        ids = model.sample_ids(features, context, self.samples, MAX_SAMPLE_TOKENS)
        rewards = self.rewards(images, model.texts(ids))
        weights = self.advantages(rewards).flatten()
        repeated = features.repeat_interleave(self.samples, dim=0)
        contexts = [c for c in context for _ in range(self.samples)]
        if references:  # one forward for samples and references: DistributedDataParallel allows one per step
            ids, contexts = ids + references, contexts + context
            repeated = torch.cat([repeated, features])
            weights = torch.cat([weights, torch.full((len(references),), xent_weight * self.samples)])
        return trained(repeated, ids, divisor, contexts, weights), rewards

    def _references(self, image: int) -> list:
        if image not in self._prepared:
            self._prepared[image] = self.cider.prepare(self.references[image])
        return self._prepared[image]
