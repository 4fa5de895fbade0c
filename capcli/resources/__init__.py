"""Package data: the ImageNet class -> noun map and the COCO object words."""
