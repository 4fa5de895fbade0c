"""What the object detector costs: captioning images/s and peak memory (RSS) of the default model, with the
detector (this checkout) and, side by side, a capcli release without it (a git checkout given with --before).

    git worktree add /tmp/capcli-before 9374b5d        # the release before the detector
    python benchmarks/detector.py --before /tmp/capcli-before --images 48 --rounds 3

Each measurement is a fresh process (so its peak RSS is its own) that loads the shipped default model, warms up
on 4 images, then captions the images at the default settings and batch size, decoding in this process as a
job of that size on a CPU does. Runs alternate (before, after, before, ...) so the machine's drift falls on
both. Images: Flickr8k's dev split from ../shared/data when it is there, else --image-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"

RUN = """
import json, resource, sys, time
from pathlib import Path
from capcli.model.pipeline import Captioner
paths = [Path(p) for p in sys.argv[1:]]
captioner = Captioner.load(device="cpu")
settings = captioner.settings()
list(captioner.caption_paths(paths[:4], settings, None, 0))
started = time.perf_counter()
done = list(captioner.caption_paths(paths, settings, None, 0))
seconds = time.perf_counter() - started
print(json.dumps({"images_per_s": len(paths) / seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                  "detector": getattr(captioner, "detector", None) is not None,
                  "captions": [c.captions[0] for _, c in done]}))
"""


def measure(source: Path, paths: list[Path]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(source)}
    done = subprocess.run([sys.executable, "-c", RUN, *map(str, paths)], capture_output=True, text=True, env=env,
                          cwd=source)
    if done.returncode != 0:
        sys.exit(f"{source}: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="a checkout of the release to compare with")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image-dir", type=Path, default=FLICKR / "images")
    args = parser.parse_args()
    names = (FLICKR / "dev.txt").read_text().split()[: args.images] if (FLICKR / "dev.txt").is_file() else None
    paths = [args.image_dir / n for n in names] if names else sorted(args.image_dir.iterdir())[: args.images]
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        runs["before"].append(measure(args.before.resolve(), paths))
        runs["after"].append(measure(ROOT, paths))
    for name, rows in runs.items():
        rates = [round(r["images_per_s"], 2) for r in rows]
        rss = [r["peak_rss_mb"] for r in rows]
        print(f"{name}: detector {rows[0]['detector']}; images/s {rates} (median {statistics.median(rates)}); "
              f"peak RSS MB {rss} (median {statistics.median(rss)})")
    ratio = statistics.median(r["images_per_s"] for r in runs["before"]) / statistics.median(
        r["images_per_s"] for r in runs["after"])
    print(f"caption time, after / before: {ratio:.2f} ({len(paths)} images, medians of {args.rounds} runs)")


if __name__ == "__main__":
    main()
