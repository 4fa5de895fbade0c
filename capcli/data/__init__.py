"""What the model is fed: finding and decoding images (images), caption data sets and their splits (captions),
the feature cache that keeps each image's features and detections by content (features), and which inputs
this process takes under --shard or a launcher (shards)."""
