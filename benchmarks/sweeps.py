"""The measurements behind capcli's CPU defaults (README "Performance"), printed as text on stdout.

- encoder: images/s of the EfficientNet-Lite0 trunk alone at batch 1-16: timm's layers against capcli's
  (batch norms folded, static padding), channels_last against the default layout, with glibc's default
  allocator and with freed memory kept (-> devices.CPU_BATCH, encoders.fold_batch_norms, capcli.allocator);
- workers: extract with 0, 1 and 2 decoding workers, on a small and a larger job (-> features.SMALL_JOB);
- caption: images/s of captioning at batch 16, 12 and 8, greedy and beam 3 (-> the CPU caption batch);
- memory: RSS after each stage of loading the default model and captioning a batch;
- startup: seconds of each stage of a one-image caption (imports, encoder, LM, the caption), in fresh processes;
- absent: images/s of the default decoding with and without --forbid-absent, alternating (-> its cost);

    python benchmarks/sweeps.py [encoder] [workers] [caption] [memory] [startup] [absent]   (all by default; about 12 minutes)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLICKR_IMAGES = ROOT.parent / "shared" / "data" / "flickr8k" / "images"


def rss_mb() -> tuple[int, int]:
    """(current, peak) resident set size of this process, MB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) // 1024, int(status["VmHWM"].split()[0]) // 1024


def images(count: int) -> list[Path]:
    if not FLICKR_IMAGES.is_dir():
        sys.exit(f"needs {FLICKR_IMAGES} (the workers and memory sweeps read real photos)")
    paths = sorted(FLICKR_IMAGES.glob("*.jpg"))[:count]
    for path in paths:  # from the page cache, not the disk
        path.read_bytes()
    return paths


def encoder_sweep(processes: int = 3) -> None:
    """Each allocator setting in fresh processes (it cannot be undone in one), several of each: with glibc's
    default, one process would run fast and the next slow (page faults, see capcli/allocator.py)."""
    for keep in (False, True):
        for _ in range(processes):
            subprocess.run([sys.executable, __file__, "encoder-rates", *(["--keep-freed-memory"] if keep else [])],
                           check=True)


def encoder_rates() -> None:
    import torch

    from capcli.allocator import keep_freed_memory
    from baselines import timm_efficientnet_lite
    from capcli.model.encoders import load_encoder

    allocator = "glibc default"
    if "--keep-freed-memory" in sys.argv:
        allocator = "freed memory kept (as the CLI runs)" if keep_freed_memory() else "glibc default (not glibc)"
    timm_layers = timm_efficientnet_lite("efficientnet-lite0")
    capcli_trunk = load_encoder().trunk  # batch norms folded, static padding (encoders.py)
    trunks = [("timm's layers", timm_layers.forward_features, timm_layers, torch.channels_last),
              ("capcli's encoder", capcli_trunk, capcli_trunk, torch.channels_last),
              ("capcli's encoder", capcli_trunk, capcli_trunk, torch.contiguous_format)]
    batch = torch.randn(48, 3, 224, 224)
    for name, forward, module, layout in trunks:
        module.to(memory_format=layout)
        rates = {}
        for size in (1, 2, 4, 8, 16):
            parts = [p.contiguous(memory_format=layout) for p in batch.split(size)]
            best = 0.0
            with torch.inference_mode():
                forward(parts[0])  # warm-up
                for _ in range(3):  # the best of three: other work on the machine only slows a run down
                    started = time.perf_counter()
                    for part in parts:
                        forward(part)
                    best = max(best, len(batch) / (time.perf_counter() - started))
            rates[size] = round(best, 1)
        layout_name = "channels_last" if layout == torch.channels_last else "default layout"
        print(f"EfficientNet-Lite0 trunk, {name}, {layout_name}, {allocator}: images/s by batch size {rates}",
              flush=True)


def workers_sweep() -> None:
    import torch

    from capcli.data.features import FeatureCache, extract
    from capcli.model.encoders import load_encoder

    encoder = load_encoder()
    for count in (48, 200):
        paths = images(count)
        for workers in (0, 1, 2):
            with tempfile.TemporaryDirectory() as folder:
                started = time.perf_counter()
                extract(paths, encoder, FeatureCache(Path(folder)), torch.device("cpu"), workers=workers)
                rate = count / (time.perf_counter() - started)
            print(f"extract {count} images, {workers} decoding workers: {rate:.1f} images/s", flush=True)


def caption_sweep() -> None:
    """Images/s of captioning 48 images at caption batch 16, 12 and 8 (-> Captioner.caption_paths' CPU default)."""
    from capcli.model.pipeline import Captioner

    captioner = Captioner.load(device="cpu")
    paths = images(48)
    list(captioner.caption_paths(paths[:4], captioner.settings(), 4, 0))  # warm-up
    for beams in (1, 3):
        settings = captioner.settings(beams=beams)
        rates: dict[int, list[float]] = {}
        for _ in range(2):
            for batch in (16, 12, 8):
                started = time.perf_counter()
                list(captioner.caption_paths(paths, settings, batch, 0))
                rates.setdefault(batch, []).append(round(len(paths) / (time.perf_counter() - started), 2))
        print(f"caption 48 images, beams {beams}: images/s by batch size (two runs) {rates}", flush=True)


def absent_sweep() -> None:
    option_cost("--forbid-absent", {"forbid_absent": True}, {"forbid_absent": False})


def option_cost(name: str, with_option: dict, without: dict, rounds: int = 3) -> None:
    """Images/s of captioning 48 images with the default model's decoding, with a decoding option and without,
    alternating so that the machine's drift falls on both."""
    from capcli.model.pipeline import Captioner

    captioner = Captioner.load(device="cpu")
    paths = images(48)
    list(captioner.caption_paths(paths[:4], captioner.settings(), 4, 0))  # warm-up
    rates: dict[bool, list[float]] = {True: [], False: []}
    captions: dict[bool, list[str]] = {}
    for _ in range(rounds):
        for on in (True, False):
            started = time.perf_counter()
            done = list(captioner.caption_paths(paths, captioner.settings(**(with_option if on else without)), 16, 0))
            rates[on].append(round(len(paths) / (time.perf_counter() - started), 2))
            captions[on] = [c.captions[0] for _, c in done]
    same = sum(a == b for a, b in zip(captions[True], captions[False]))
    print(f"caption 48 images, default decoding: images/s with {name} {rates[True]}, without "
          f"{rates[False]}; {same}/48 captions the same", flush=True)


def memory_sweep() -> None:
    def stage(name: str) -> None:
        now, peak = rss_mb()
        print(f"memory, {name}: RSS {now} MB, peak {peak} MB", flush=True)

    stage("start")
    import torch
    import transformers  # noqa: F401

    stage("import torch, transformers")
    import transformers.models.llama.modeling_llama  # noqa: F401

    stage("+ the LM's modeling code")
    from capcli.model.pipeline import Captioner

    captioner = Captioner.load(device="cpu")
    stage("default model loaded (LM weights memory-mapped, not yet read)")
    with torch.no_grad():
        sum(float(p.sum()) for p in captioner.model.lm.model.parameters())
    stage("LM weights read")
    for _ in captioner.caption_paths(images(32), captioner.settings()):
        pass
    stage("32 images captioned (batch 16, default decoding)")


def startup_sweep(processes: int = 3) -> None:
    """Each run in a fresh process: imports are only slow the first time in a process."""
    for _ in range(processes):
        subprocess.run([sys.executable, __file__, "startup-stages"], check=True)


def startup_stages() -> None:
    """What `capcli caption examples/chelsea.png` does, stage by stage, on the CPU."""
    times, last = [], time.perf_counter()

    def stage(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        times.append(f"{name} {now - last:.2f}")
        last = now

    import torch

    stage("import torch")
    from transformers import LlamaForCausalLM  # noqa: F401

    stage("the LM's modeling code")
    from capcli.config import DEFAULT_ENCODER, DEFAULT_LM
    from capcli.data.images import open_image
    from capcli.model.encoders import load_encoder
    from capcli.model.lm import load_lm
    from capcli.model.pipeline import Captioner

    stage("capcli's modules")
    load_encoder(DEFAULT_ENCODER)
    stage("the encoder")
    load_lm(DEFAULT_LM)
    stage("the LM (first load in the process)")
    captioner = Captioner.load(device="cpu")
    stage("the whole default model again")
    image = captioner.encoder.preprocess(open_image(ROOT / "examples" / "chelsea.png"))[None]
    for name in ("first caption (default decoding)", "second caption"):
        with torch.inference_mode():
            captioner.caption_tensors(image, captioner.settings())
        stage(name)
    print("start-up stages, seconds: " + "; ".join(times), flush=True)


def main() -> None:
    warnings.filterwarnings("ignore")
    sweeps = {"encoder": encoder_sweep, "workers": workers_sweep, "caption": caption_sweep, "memory": memory_sweep,
              "startup": startup_sweep, "absent": absent_sweep}
    if sys.argv[1:2] == ["encoder-rates"]:  # one process of the encoder sweep
        return encoder_rates()
    if sys.argv[1:2] == ["startup-stages"]:  # one process of the start-up sweep
        return startup_stages()
    from capcli.allocator import keep_freed_memory

    keep_freed_memory()  # the workers and memory sweeps measure what the CLI does, allocator included
    chosen = sys.argv[1:] or list(sweeps)
    for name in chosen:
        if name not in sweeps:
            sys.exit(f"unknown sweep {name!r}: choose from {', '.join(sweeps)}")
    for name in chosen:
        if name == "memory" and len(chosen) > 1:  # in a fresh process, or the other sweeps' memory counts
            subprocess.run([sys.executable, __file__, "memory"], check=True)
        else:
            sweeps[name]()


if __name__ == "__main__":
    main()
