"""What a retrieval memory costs when captioning: the same images without and with a memory, one run.

    python benchmarks/memory.py --memory runs/flickr-train-memory          # 48 Flickr8k dev images
    python benchmarks/memory.py --memory DIR --images 16

Rows: the default decoding (beam 3); beam 5 returning its 5 best (what the vote decodes); and beam 5 with
the memory's vote (search, then CIDEr-D consensus over 5 neighbours). Seconds after one warm-up batch. Writes benchmarks/results/memory-cpu.md.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from capcli.data.images import open_image
from capcli.model.pipeline import Captioner

ROOT = Path(__file__).resolve().parent.parent
DEV = ROOT.parent / "shared" / "data" / "flickr8k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=Path, required=True)
    parser.add_argument("--images", type=int, default=48)
    args = parser.parse_args()

    names = (DEV / "dev.txt").read_text().split()[: args.images]
    captioner = Captioner.load(None, device="cpu")
    images = torch.stack([captioner.encoder.preprocess(open_image(DEV / "images" / n)) for n in names])

    def timed(memory: bool, model: Captioner = captioner, **options) -> float:
        model.memory = None
        if memory:
            model.use_memories([args.memory])
            model.memory.cider()  # document frequencies: computed once per memory, at the first vote
        settings = model.settings(**options)
        model.caption_tensors(images[:2], settings)  # warm-up
        start = time.perf_counter()
        model.caption_tensors(images, settings)
        return time.perf_counter() - start

    rows = [("default (beam 3), no memory", timed(False)),
            ("beam 5, its 5 best decoded, no memory", timed(False, beams=5, num_captions=5)),
            ("beam 5 + memory vote (5 candidates, 5 neighbours)", timed(True, beams=5))]
    base = rows[1][1]
    lines = [f"# Captioning with a memory, {platform.machine()}, {torch.get_num_threads()} threads", "",
             f"`python benchmarks/memory.py --memory {args.memory} --images {args.images}"
             + f"`: {len(names)} Flickr8k dev images, memory of {len(captioner.memory)} images.", "",
             "| decoding | seconds | images/s | vs beam 5 without memory | vs the default beam 3 without memory |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {s:.1f} | {len(names) / s:.2f} | {s / base:.2f}x | {s / rows[0][1]:.2f}x |"
              for name, s in rows]
    out = ROOT / "benchmarks" / "results" / "memory-cpu.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
