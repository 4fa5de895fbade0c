"""Does a lower-precision frozen LM pay on this CPU? Each setting against fp32 on the same images, one run.

    python benchmarks/precision.py                 # 32 Flickr8k dev images (or examples/ variants), greedy
    python benchmarks/precision.py --images 16 --beams 3
    python benchmarks/precision.py --split ../shared/data/flickr8k/dev.txt --only "and down_proj"   # dev metrics

For each setting: seconds to caption the images (encoder + decoding, after one warm-up batch), the speed-up
over fp32, and how many captions are identical to fp32's. Writes benchmarks/results/precision-<machine>.md.
With --split, the chosen settings and fp32 each caption that Flickr8k split with the model's default decoding
instead, and are scored against its references (what `auto` must hold: README "Performance").
Settings: torch.ao dynamic int8 of every Linear but the LM head (and of the MLPs only, the attention only;
with per-channel weight scales, also without the MLPs' down projections), and torchao's int8 weight-only
and dynamic int8 configs (needs `pip install torchao`), and the LM's weights stored in bf16 (not autocast: no
per-step conversion).
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
import warnings
from pathlib import Path

import torch

from capcli.data.images import open_image
from capcli.model.pipeline import Captioner

ROOT = Path(__file__).resolve().parent.parent
DEV = ROOT.parent / "shared" / "data" / "flickr8k"
TABLE = ROOT / "benchmarks" / "results" / "precision-cpu.md"


def cpu_features() -> str:
    """The vector extensions int8 and bf16 kernels depend on, as /proc/cpuinfo lists them."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)


def images_for(count: int) -> list[Path]:
    split = DEV / "dev.txt"
    if split.is_file():
        names = split.read_text().split()[:count]
        return [DEV / "images" / n for n in names]
    return sorted((ROOT / "examples").glob("*.*"))[:count]


def torch_ao_dynamic(model, keep, per_channel=False):
    from torch.ao.quantization import (
        default_dynamic_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic,
    )

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    spec = {n: qconfig for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and keep(n)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, spec, dtype=torch.qint8)


def torchao(config_name):
    def convert(model):
        import torchao.quantization as q

        q.quantize_(model, getattr(q, config_name)())
        return model
    return convert


def bf16_weights(model):
    model = model.to(torch.bfloat16)
    generate = model.generate

    def generate_from_bf16(*args, inputs_embeds=None, **kwargs):  # the mapper's prefix stays fp32
        return generate(*args, inputs_embeds=inputs_embeds.to(torch.bfloat16), **kwargs)

    model.generate = generate_from_bf16
    return model


SETTINGS = {
    "torch.ao dynamic int8, all Linear but lm_head": lambda m: torch_ao_dynamic(m, lambda n: n != "lm_head"),
    "torch.ao dynamic int8, MLP only": lambda m: torch_ao_dynamic(m, lambda n: ".mlp." in n),
    "torch.ao dynamic int8, attention only": lambda m: torch_ao_dynamic(m, lambda n: ".self_attn." in n),
    # one weight scale per output channel instead of per tensor
    "torch.ao dynamic int8, per-channel weights, all Linear but lm_head":
        lambda m: torch_ao_dynamic(m, lambda n: n != "lm_head", per_channel=True),
    # down_proj reads the MLP's largest activations
    "torch.ao dynamic int8, per-channel weights, all Linear but lm_head and down_proj":
        lambda m: torch_ao_dynamic(m, lambda n: n != "lm_head" and "down_proj" not in n, per_channel=True),
    "torchao Int8WeightOnlyConfig": torchao("Int8WeightOnlyConfig"),
    "torchao Int8DynamicActivationInt8WeightConfig": torchao("Int8DynamicActivationInt8WeightConfig"),
    "bf16 weights": bf16_weights,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--only", default="", help="comma-separated substrings of the settings to run")
    parser.add_argument("--split", help="score the settings on this Flickr8k split instead (default decoding)")
    parser.add_argument("--out", type=Path, default=TABLE, help="the table to write")
    args = parser.parse_args()
    if args.split:
        return dev_metrics(Path(args.split), args.only)

    torch.manual_seed(0)
    captioner = Captioner.load(None, device="cpu")
    paths = images_for(args.images)
    images = torch.stack([captioner.encoder.preprocess(open_image(p)) for p in paths])
    settings = captioner.settings(beams=args.beams, max_new_tokens=args.max_new_tokens)
    fp32 = captioner.model.lm.model

    def timed(model):
        captioner.model.lm.model = model
        captioner.caption_tensors(images[:2], settings, False)  # warm-up
        start = time.perf_counter()
        captions = [c.captions[0] for c in captioner.caption_tensors(images, settings, False)]
        return captions, time.perf_counter() - start

    reference, base_seconds = timed(fp32)
    rows = [("fp32 (today)", base_seconds, len(reference), reference[0])]
    print(f"fp32: {base_seconds:.2f} s", flush=True)
    for name, convert in chosen(args.only).items():
        captions, seconds = timed(convert(copy.deepcopy(fp32)))
        same = sum(a == b for a, b in zip(reference, captions))
        rows.append((name, seconds, same, captions[0]))
        print(f"{name}: {seconds:.2f} s, {same}/{len(reference)} identical", flush=True)

    lines = [f"# LM precision on {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
             "", f"CPU: {cpu_features()}.", "", f"`python benchmarks/precision.py --images {args.images} --beams {args.beams} "
             f"--max-new-tokens {args.max_new_tokens}{command_tail(args)}`: {len(paths)} images, torch {torch.__version__}.", "",
             "| LM setting | seconds | speed-up | captions identical to fp32 | first caption |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {s:.2f} | {base_seconds / s:.2f}x | {same}/{len(reference)} | {first} |"
              for name, s, same, first in rows]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def command_tail(args) -> str:
    """The options that chose the settings and the output, as typed."""
    tail = f' --only "{args.only}"' if args.only else ""
    return tail + (f" --out {args.out}" if args.out != TABLE else "")


def chosen(only: str) -> dict:
    return {name: convert for name, convert in SETTINGS.items()
            if not only or any(part in name for part in only.split(","))}


def dev_metrics(split: Path, only: str) -> None:
    """BLEU-4 and CIDEr of fp32 and each chosen setting on the split, and how many captions each changes."""
    from capcli.data.captions import load_captions
    from capcli.outputs.evaluate import score

    captioner = Captioner.load(None, device="cpu")
    references = load_captions(DEV, split)
    refs = {str(p): c for p, c in references.captions.items()}
    fp32 = captioner.model.lm.model
    baseline = None
    for name, convert in {"fp32 (today)": None, **chosen(only)}.items():
        captioner.model.lm.model = fp32 if convert is None else convert(copy.deepcopy(fp32))
        started = time.perf_counter()
        captions = {str(p): c.captions[0] for p, c in captioner.caption_paths(references.images, captioner.settings())
                    if not isinstance(c, Exception)}
        seconds = time.perf_counter() - started
        metrics, _, _ = score(captions, refs)
        baseline = baseline or captions
        same = sum(captions[k] == baseline[k] for k in captions)
        print(f"{name}: {len(captions)} images of {split.name} in {seconds:.0f} s, BLEU-4 {metrics['BLEU-4']:.3f}, "
              f"CIDEr {metrics['CIDEr']:.3f}, {same}/{len(captions)} captions as fp32's", flush=True)


if __name__ == "__main__":
    main()
