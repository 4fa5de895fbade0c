"""The frozen LM's conversion cache holds what transformers loads, in the layout it loads fastest."""

import json

import torch


def test_tied_weights_are_stored_once_under_the_name_transformers_ties_from(tiny_lm, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from capcli.lm import _stored_once

    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tiny LM ties them, as SmolLM2 does
    stored = _stored_once(model.state_dict())
    # Stored as lm_head.weight (as safetensors' save_model chooses), transformers would fill the embedding at
    # random before tying the two: half a second at every start for SmolLM2.
    assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored
    save_file(stored, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as saved:
        assert len(list(saved.keys())) == len(stored)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
