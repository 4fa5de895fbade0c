"""Training the prefix mapper: cross-entropy on captions, checkpoints, resume and data-parallel runs (train),
and self-critical fine-tuning on sampled captions' CIDEr-D (scst)."""
