"""GPU throughput in one short run (under 5 minutes on one H200-class GPU): run it when a GPU is lent.

    python benchmarks/gpu.py                          # --device cuda; writes benchmarks/results/gpu.json
    python benchmarks/gpu.py --device cpu --batches 2 --images 4 --max-new-tokens 3 --out /tmp/smoke.json

With the shipped model, on Flickr8k dev images (else examples/ repeated), decoded and preprocessed once:
- extract: the encoder alone, images/s at each batch size;
- detect: the object detector alone (OpenCV on the CPU, one process), images/s;
- caption: images/s at each batch size, greedy and the model's default decoding (beam 3, no repeated
  3-grams), under capcli's autocast (bf16 on CUDA), the labels included as `capcli caption` computes them
  and the detections made once above (in `capcli caption` the decoding workers detect beside the GPU).
Each figure is timed after a warm-up batch of the same size, with the device synchronised; the peak device
memory is recorded per row. Target (issue 15): >= 1,000 images/s greedy at batch 256.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from capcli.data.images import open_image
from capcli.devices import autocast
from capcli.model.pipeline import Captioner

ROOT = Path(__file__).resolve().parent.parent
DEV = ROOT.parent / "shared" / "data" / "flickr8k"


def image_files(count: int) -> list[Path]:
    if (DEV / "dev.txt").is_file():
        return [DEV / "images" / n for n in (DEV / "dev.txt").read_text().split()[:count]]
    examples = sorted((ROOT / "examples").glob("*.*"))
    return [examples[i % len(examples)] for i in range(count)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None


def timed(device: torch.device, run) -> float:
    run()  # warm-up: kernels chosen, caches filled
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", default="64,256,1024", help="comma-separated batch sizes")
    parser.add_argument("--images", type=int, default=256, help="distinct images (repeated to fill a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu.json")
    args = parser.parse_args()

    captioner = Captioner.load(None, device=args.device)
    device = captioner.device
    started = time.perf_counter()
    pictures = [open_image(p) for p in image_files(args.images)]
    pixels = torch.stack([captioner.encoder.preprocess(p) for p in pictures])
    rows, objects = [], None
    if captioner.detector is not None:  # OpenCV on the CPU; `capcli caption` runs it in the decoding workers
        begun = time.perf_counter()
        objects = [captioner.detector.detect(p) for p in pictures]
        seconds = time.perf_counter() - begun
        rows.append({"what": "detect (OpenCV, CPU, one process)", "batch": 1, "seconds": round(seconds, 3),
                     "images_per_s": round(len(pictures) / seconds, 1), "peak_device_mb": None})
        print(rows[-1], flush=True)
    for batch_size in [int(b) for b in args.batches.split(",")]:
        copies = (batch_size + len(pixels) - 1) // len(pixels)
        batch = pixels.repeat(copies, 1, 1, 1)[:batch_size]
        found = (objects * copies)[:batch_size] if objects is not None else None

        def encode():
            with torch.inference_mode(), autocast(device):
                captioner.encoder(batch.to(device))

        seconds = timed(device, encode)
        rows.append({"what": "extract (encoder)", "batch": batch_size, "seconds": round(seconds, 3),
                     "images_per_s": round(batch_size / seconds, 1), "peak_device_mb": peak_mb(device)})
        print(rows[-1], flush=True)
        for name, options in (("greedy", {"beams": 1}), ("default (beam 3)", {})):
            settings = captioner.settings(max_new_tokens=args.max_new_tokens, **options)
            seconds = timed(device, lambda: captioner.caption_tensors(batch, settings, with_labels=True,
                                                                      objects=found))
            rows.append({"what": f"caption, {name}", "batch": batch_size, "seconds": round(seconds, 3),
                         "images_per_s": round(batch_size / seconds, 1), "peak_device_mb": peak_mb(device)})
            print(rows[-1], flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {"command": "python benchmarks/gpu.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                 vars(args).items() if k != "out"),
              "device": name, "torch": torch.__version__, "images": len(pixels),
              "seconds_in_all": round(time.perf_counter() - started, 1), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
