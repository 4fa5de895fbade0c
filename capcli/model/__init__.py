"""The model: the frozen image encoder (encoders, lite), the frozen language model (lm), the trained prefix
mapper (mapper), the captioner that joins them and decodes (pipeline), and the model dir that describes them
on disk (modeldir: its files, and the one factory, load_model, that everything else starts from)."""
