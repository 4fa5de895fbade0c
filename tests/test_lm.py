"""The frozen LM's conversion cache holds what transformers loads, in the layout it loads fastest."""

import torch


def test_tied_weights_are_stored_once_under_the_name_transformers_ties_from(tiny_lm, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from capcli.model.lm import _write_folder

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_lm), AutoTokenizer.from_pretrained(tiny_lm)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tiny LM ties them, as SmolLM2 does
    _write_folder(model, tokenizer, tmp_path)  # what the GGUF conversion writes
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as saved:
        names = set(saved.keys())
    # Stored as lm_head.weight (as safetensors' save_model chooses), transformers would fill the embedding at
    # random before tying the two: half a second at every start for SmolLM2.
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert len(names) == len(model.state_dict()) - 1  # every other tensor, once

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
