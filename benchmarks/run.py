"""capcli's benchmarks, side by side with the baselines (benchmarks/baselines.py), on the same images and model.

    python benchmarks/run.py                      # defaults: about 10 minutes on a 2-core CPU
    python benchmarks/run.py --images 8 --train-steps 1 --skip startup,memory   # a quick look

Writes benchmarks/results/<machine>.json and .md (the table quoted in the README). Images: --image-dir, else
Flickr8k's dev split from ../shared/data when it is there, else variants (crops, flips) of examples/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from baselines import naive_caption, per_image_generate, seed_extract  # noqa: E402

from capcli.allocator import keep_freed_memory  # noqa: E402
from capcli.data.features import FeatureCache, extract  # noqa: E402
from capcli.data.images import open_image  # noqa: E402
from capcli.devices import (  # noqa: E402
    CPU_BATCH,  # noqa: E402
    autocast,
    resolve_device,
)
from capcli.files import cache_dir  # noqa: E402
from capcli.model.pipeline import Captioner  # noqa: E402

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"
LM_MODELING = "transformers.models.llama.modeling_llama"  # the default LM (SmolLM2) is a Llama
LM_FLOOR = "import torch, transformers; from transformers import LlamaForCausalLM"
SECTIONS = ("extract", "caption", "train", "startup", "memory")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


# ---------------------------------------------------------------- inputs

def pick_images(args, workdir: Path) -> tuple[list[Path], list[str]]:
    """Distinct images (the cache would skip copies) and one caption for each."""
    if args.image_dir:
        paths = sorted(p for p in Path(args.image_dir).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        return paths[: args.images], ["a photo ."] * min(len(paths), args.images)
    if FLICKR.is_dir():
        from capcli.data.captions import load_captions

        data = load_captions(FLICKR, FLICKR / "dev.txt")
        paths = data.images[: args.images]
        return paths, [data.captions[p][0] for p in paths]
    from PIL import ImageOps

    sources = sorted((ROOT / "examples").glob("*.[jp][pn]g"))
    paths = []
    for n in range(args.images):
        image = open_image(sources[n % len(sources)])
        w, h = image.size
        k = n // len(sources)
        box = (k * w // 40, k * h // 50, w - k * w // 60, h - k * h // 45)  # a different crop each round
        image = image.crop(box)
        if k % 2:
            image = ImageOps.mirror(image)
        path = workdir / f"variant{n:03d}.jpg"
        image.save(path, quality=92)
        paths.append(path)
    return paths, ["a photo of something ."] * len(paths)


# ---------------------------------------------------------------- sections

def bench_extract(captioner, paths, device, workdir, repeats: int = 3) -> dict:
    """The best of `repeats` runs of each: other work on the machine can only slow a run down."""
    encoder = captioner.encoder
    for path in paths:  # both read the images from the page cache, not the disk
        path.read_bytes()
    seed_extract(paths[:2], captioner.model.config.encoder, encoder.preprocess, device)  # warm-up both
    extract(paths[:2], encoder, FeatureCache(workdir / "warm-up-cache"), device)
    capcli_s = seed_s = encoder_s = float("inf")
    for run in range(repeats):
        cache = FeatureCache(workdir / f"extract-cache-{run}")  # empty: every image is encoded
        (digests, _, _), seconds = timed(extract, paths, encoder, cache, device)  # its default batch size
        capcli_s = min(capcli_s, seconds)
        seed, seconds = timed(seed_extract, paths, captioner.model.config.encoder, encoder.preprocess, device)
        seed_s = min(seed_s, seconds)
    ours = cache.load(encoder.encoder_id, [digests[p] for p in paths])
    # The ceiling: the encoder alone on images already decoded, at capcli's batch size, no files and no cache
    decoded = torch.stack([encoder.preprocess(open_image(p)) for p in paths])
    for _ in range(repeats):
        _, seconds = timed(lambda: [encode_only(encoder, part, device)
                                    for part in decoded.split(64 if device.type == "cuda" else CPU_BATCH)])
        encoder_s = min(encoder_s, seconds)
    return {"images": len(paths), "repeats": repeats, "capcli_images_per_s": len(paths) / capcli_s,
            "seed_images_per_s": len(paths) / seed_s, "speedup": seed_s / capcli_s,
            "encoder_only_images_per_s": len(paths) / encoder_s,
            "max_feature_difference": float((ours - seed).abs().max())}


@torch.inference_mode()
def encode_only(encoder, images, device):
    with autocast(device):
        return encoder(images.to(device))


def bench_caption(captioner, paths, batch_size, naive_count) -> dict:
    results = {}
    list(captioner.caption_paths(paths[:2], captioner.settings(beams=1), batch_size))  # warm-up
    for beams in (1, 3):
        # The reference decoders neither block repeated n-grams nor forbid the words for absent things.
        settings = captioner.settings(beams=beams, no_repeat_ngram_size=0, forbid_absent=False)
        ours, ours_s = timed(lambda: [c.captions[0] for _, c in captioner.caption_paths(paths, settings, batch_size)])
        single, single_s = timed(per_image_generate, captioner, paths, settings)
        few = paths[:naive_count]
        naive, naive_s = timed(naive_caption, captioner, few, settings)
        name = "greedy" if beams == 1 else f"beam{beams}"
        results[name] = {
            "images": len(paths), "naive_images": len(few),
            "capcli_images_per_s": len(paths) / ours_s, "per_image_generate_images_per_s": len(paths) / single_s,
            "naive_images_per_s": len(few) / naive_s,
            "speedup_vs_naive": (naive_s / len(few)) / (ours_s / len(paths)),
            "speedup_vs_per_image_generate": single_s / ours_s,
            "same_as_per_image_generate": sum(a == b for a, b in zip(ours, single)),
            "same_as_naive": sum(a == b for a, b in zip(ours, naive)),
            "examples": list(zip(map(str, paths[:3]), ours[:3])),
        }
        log(f"caption {name}: {results[name]}")
    return results


def bench_train(captioner, paths, captions, device, steps, batch_size, workdir) -> dict:
    model = captioner.model
    start = {k: v.clone() for k, v in model.mapper.state_dict().items()}
    ids = model.tokenize(captions, 40)
    cache = FeatureCache(workdir / "extract-cache")
    digests, _, _ = extract(paths, captioner.encoder, cache, device)
    cached = cache.load(captioner.encoder.encoder_id, [digests[p] for p in paths])
    batches = [[(step * batch_size + i) % len(paths) for i in range(batch_size)] for step in range(steps + 1)]

    def encode(rows):  # what training without a feature cache does at every step
        images = torch.stack([captioner.encoder.preprocess(open_image(paths[r])) for r in rows]).to(device)
        with torch.inference_mode(), autocast(device):
            return captioner.encoder(images).float().mean(1).clone()

    def run(features_of, precision="auto") -> tuple[float, list[float]]:
        model.mapper.load_state_dict(start)
        model.mapper.train()
        optimizer = torch.optim.AdamW([p for p in model.mapper.parameters() if p.requires_grad], lr=1e-4)
        losses, started = [], None
        for n, rows in enumerate(batches):
            if n == 1:
                started = time.perf_counter()  # step 0 is a warm-up
            with autocast(device, precision):
                loss = model.loss(features_of(rows).to(device).float(), [ids[r] for r in rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return time.perf_counter() - started, losses

    cached_s, cached_losses = run(lambda rows: cached[rows])
    encoding_s, encoding_losses = run(encode)
    bf16_s, bf16_losses = run(lambda rows: cached[rows], "bf16")  # `capcli train --precision bf16`
    model.mapper.load_state_dict(start)
    model.mapper.eval()
    captions_done = steps * batch_size
    return {"steps": steps, "batch_size": batch_size, "cached_captions_per_s": captions_done / cached_s,
            "reencoding_captions_per_s": captions_done / encoding_s, "speedup": encoding_s / cached_s,
            "max_loss_difference": max(abs(a - b) for a, b in zip(cached_losses, encoding_losses)),
            "bf16_captions_per_s": captions_done / bf16_s, "bf16_speedup": cached_s / bf16_s,
            "bf16_max_loss_difference": max(abs(a - b) for a, b in zip(cached_losses, bf16_losses))}


# Run the measured command from a small fresh Python: a child forked from this big process would count this
# process's memory, copied at fork, in its peak RSS.
_MEASURE = """
import resource, subprocess, sys, time
started = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)
"""


def run_process(command: list[str], env: dict | None = None, stdin: str | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB: the largest of the process and the children it waited for)."""
    result = subprocess.run([sys.executable, "-c", _MEASURE, *command], env=env, input=stdin or "",
                            capture_output=True, text=True)
    wall, peak_kb, code = result.stdout.split()
    if int(code) != 0:
        raise RuntimeError(f"{' '.join(command)} exited {code}: {result.stderr[-2000:]}")
    return float(wall), int(peak_kb) / 1024


def capcli_command() -> list[str]:
    return [sys.executable, "-m", "capcli"]


def bench_startup(image: Path, runs: int, workdir: Path) -> dict:
    floor = [run_process([sys.executable, "-c", "import torch, transformers"])[0] for _ in range(runs)]
    # transformers imports lazily: running any LM through it also imports its modeling code (and with it
    # torch._dynamo, torch.distributed, scipy and sympy), the floor for a program that uses the default LM.
    # Issue 15 defines it through transformers' lazy top level; importing the module directly is a bit faster.
    lm_floor = [run_process([sys.executable, "-c", LM_FLOOR])[0] for _ in range(runs)]
    module_floor = [run_process([sys.executable, "-c", f"import torch, {LM_MODELING}"])[0] for _ in range(runs)]
    helps = [run_process(capcli_command() + ["--help"])[0] for _ in range(runs)]
    run_process(capcli_command() + ["caption", str(image), "-q"])  # make sure every cache is warm
    warm = [run_process(capcli_command() + ["caption", str(image), "-q"])[0] for _ in range(runs)]
    result = {"import_floor_s": statistics.median(floor), "lm_import_floor_s": statistics.median(lm_floor),
              "lm_module_import_floor_s": statistics.median(module_floor),
              "help_s": statistics.median(helps), "warm_caption_one_image_s": statistics.median(warm)}
    result["warm_over_floor"] = result["warm_caption_one_image_s"] / result["import_floor_s"]
    gguf = cache_dir() / "downloads"
    if gguf.is_dir():  # cold: a fresh cache; the LM file is copied in (no network), so it is converted again
        cold = workdir / "cold-cache"
        shutil.copytree(gguf, cold / "downloads")
        env = {**os.environ, "CAPCLI_CACHE": str(cold)}
        result["cold_caption_one_image_s"] = run_process(capcli_command() + ["caption", str(image), "-q"], env)[0]
    return result


def bench_memory(paths, captions, workdir, steps) -> dict:
    listing = "".join(f"{p}\n" for p in paths)
    _, caption_mb = run_process(capcli_command() + ["caption", "-", "-q", "-o", os.devnull], stdin=listing)
    data = workdir / "train-data"
    data.mkdir()
    for path in paths:
        shutil.copy(path, data / path.name)
    rows = ["image,caption"] + [f'{p.name},"{c}"' for p, c in zip(paths, captions)]
    (data / "captions.csv").write_text("\n".join(rows) + "\n")
    _, train_mb = run_process(capcli_command() + ["train", "--data", str(data), "--out", str(workdir / "train-out"),
                                                  "--features", str(workdir / "train-features"), "--batch-size",
                                                  "32", "--max-steps", str(steps), "-q"])
    return {"caption_peak_rss_mb": caption_mb, "caption_images": len(paths), "train_peak_rss_mb": train_mb,
            "train_batch_size": 32}


# ---------------------------------------------------------------- report

def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores, {cpu}"
    return f"{where}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def markdown(r: dict) -> str:
    rows = ["| what | capcli | baseline | ratio | target |", "| --- | --- | --- | --- | --- |"]
    if "extract" in r:
        e = r["extract"]
        rows.append(f"| extract, images/s ({e['images']} images) | {e['capcli_images_per_s']:.1f} | "
                    f"{e['seed_images_per_s']:.1f} (seed: one at a time, hook on the pooling layer) | "
                    f"{e['speedup']:.2f}x | >= 2x |")
        if "encoder_only_images_per_s" in e:
            rows.append(f"| extract ceiling: the encoder alone on decoded images, images/s | "
                        f"{e['encoder_only_images_per_s']:.1f} | {e['seed_images_per_s']:.1f} (seed) | "
                        f"{e['encoder_only_images_per_s'] / e['seed_images_per_s']:.2f}x | |")
    for name, c in r.get("caption", {}).items():
        rows.append(f"| caption {name}, images/s | {c['capcli_images_per_s']:.2f} | {c['naive_images_per_s']:.2f} "
                    f"(naive: no KV cache, one image at a time; {c['naive_images']} images) | "
                    f"{c['speedup_vs_naive']:.1f}x | >= 5x |")
        rows.append(f"| caption {name}, images/s | {c['capcli_images_per_s']:.2f} | "
                    f"{c['per_image_generate_images_per_s']:.2f} (generate, one image at a time) | "
                    f"{c['speedup_vs_per_image_generate']:.1f}x | >= 2x |")
        rows.append(f"| caption {name}, same captions | | {c['same_as_naive']}/{c['naive_images']} naive, "
                    f"{c['same_as_per_image_generate']}/{c['images']} per-image generate | | "
                    f"{'identical' if name == 'greedy' else '-'} |")
    if "train" in r:
        t = r["train"]
        rows.append(f"| train, captions/s (batch {t['batch_size']}, {t['steps']} steps) | "
                    f"{t['cached_captions_per_s']:.2f} (cached features) | {t['reencoding_captions_per_s']:.2f} "
                    f"(re-encoding images each step) | {t['speedup']:.2f}x | loss equal (max diff "
                    f"{t['max_loss_difference']:.1e}) |")
        if "bf16_captions_per_s" in t:
            rows.append(f"| train, captions/s, `--precision bf16` | {t['bf16_captions_per_s']:.2f} (bf16 autocast) | "
                        f"{t['cached_captions_per_s']:.2f} (default precision) | {t['bf16_speedup']:.2f}x | "
                        f"opt-in: loss differs by up to {t['bf16_max_loss_difference']:.1e} |")
    if "startup" in r:
        s = r["startup"]
        rows.append(f"| start-up, `capcli caption one.jpg`, warm caches | {s['warm_caption_one_image_s']:.1f} s | "
                    f"{s['import_floor_s']:.1f} s (`import torch, transformers`) | {s['warm_over_floor']:.2f}x | "
                    f"<= 1.5x |")
        if "lm_import_floor_s" in s:
            rows.append(f"| start-up, warm, against the LM's import floor | {s['warm_caption_one_image_s']:.1f} s | "
                        f"{s['lm_import_floor_s']:.1f} s (`{LM_FLOOR}`) | "
                        f"{s['warm_caption_one_image_s'] / s['lm_import_floor_s']:.2f}x | <= 1.3x |")
        if "lm_module_import_floor_s" in s:
            rows.append(f"| start-up, warm, against importing the LM's modeling module | "
                        f"{s['warm_caption_one_image_s']:.1f} s | {s['lm_module_import_floor_s']:.1f} s "
                        f"(`import torch, {LM_MODELING}`) | "
                        f"{s['warm_caption_one_image_s'] / s['lm_module_import_floor_s']:.2f}x | |")
            rows.append(f"| start-up, `capcli --help` | {s['help_s']:.1f} s | | | |")
        if "cold_caption_one_image_s" in s:
            rows.append(f"| start-up, cold caches (LM converted again) | {s['cold_caption_one_image_s']:.1f} s | | | |")
    if "memory" in r:
        m = r["memory"]
        rows.append(f"| peak RSS, caption {m['caption_images']} images | {m['caption_peak_rss_mb']:.0f} MB | | | "
                    f"<= 1,024 MB |")
        rows.append(f"| peak RSS, train (batch {m['train_batch_size']}) | {m['train_peak_rss_mb']:.0f} MB | | | "
                    f"<= 4,096 MB |")
    return (f"Machine: {r['machine']}. Device: {r['device']}. Model: {r['model']}. "
            f"Allocator: {r.get('allocator', 'the default')}.\n"
            f"Command: `{r['command']}` ({r['seconds']:.0f} s).\n\n" + "\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48, help="images for extract, caption and memory")
    parser.add_argument("--naive-images", type=int, default=16, help="images for the (slow) naive decoder")
    parser.add_argument("--image-dir", help="take images from this folder")
    parser.add_argument("--model", help="model dir (default: the shipped model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None, help="caption batch (default: capcli's, 16 CPU, 64 GPU)")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--startup-runs", type=int, default=3)
    parser.add_argument("--skip", default="", help=f"comma-separated sections to skip: {', '.join(SECTIONS)}")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for the .json and .md")
    args = parser.parse_args()
    # Like the CLI (capcli.allocator), so the library calls measured here run as `capcli` runs them; the
    # baselines run in this same process, so they get the same allocator.
    kept = keep_freed_memory()
    skip = set(filter(None, args.skip.split(",")))
    device = resolve_device(args.device)
    batch_size = args.batch_size  # None: capcli's default for the device
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        paths, captions = pick_images(args, workdir)
        captioner = Captioner.load(args.model, device=args.device)
        results = {"machine": machine(device), "device": str(device), "model": str(captioner.model_dir),
                   "allocator": "glibc, freed memory kept (as the CLI)" if kept else "the C library's default",
                   "command": " ".join(["python", "benchmarks/run.py", *sys.argv[1:]]),
                   "images_from": str(paths[0].parent)}
        if "extract" not in skip:
            results["extract"] = bench_extract(captioner, paths, device, workdir)
            log(f"extract: {results['extract']}")
        if "caption" not in skip:
            results["caption"] = bench_caption(captioner, paths, batch_size, args.naive_images)
        if "train" not in skip:
            results["train"] = bench_train(captioner, paths, captions, device, args.train_steps, 32, workdir)
            log(f"train: {results['train']}")
        if "startup" not in skip:
            results["startup"] = bench_startup(paths[0], args.startup_runs, workdir)
            log(f"startup: {results['startup']}")
        if "memory" not in skip:
            results["memory"] = bench_memory(paths, captions, workdir, args.train_steps)
            log(f"memory: {results['memory']}")
    results["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu" if device.type == "cuda" else "cpu"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
