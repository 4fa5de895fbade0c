"""Score captions against references with pycocoevalcap (BLEU-1..4, METEOR, ROUGE-L, CIDEr), and write an
HTML report for looking at the failures.

The COCO metrics expect PTB-tokenized text, and both the PTB tokenizer and METEOR are Java programs.
Without Java, capcli says so once, uses the Python tokenizer below (lower-case, punctuation removed, split on
spaces: close to PTB for plain English captions) and leaves METEOR out.
"""

from __future__ import annotations

import base64
import html
import io
import shutil
from pathlib import Path
from typing import Callable

from capcli.text import python_tokenize


def java_available() -> bool:
    return shutil.which("java") is not None



def score(predictions: dict[str, str], references: dict[str, list[str]],
          warn: Callable[[str], None] = lambda s: None) -> tuple[dict[str, float], dict[str, float], str]:
    """Corpus metrics (fractions), per-image CIDEr, and the tokenizer used."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    keys = sorted(predictions)
    use_java = java_available()
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({k: [{"caption": c} for c in references[k]] for k in keys})
        res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in keys})
    else:
        warn("Java is not installed: using the Python tokenizer and leaving out METEOR (install a JRE for both)")
        gts = {k: [python_tokenize(c) for c in references[k]] for k in keys}
        res = {k: [python_tokenize(predictions[k])] for k in keys}
    metrics: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    metrics.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    if use_java:
        from pycocoevalcap.meteor.meteor import Meteor

        metrics["METEOR"] = float(Meteor().compute_score(gts, res)[0])
    metrics["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    cider, per_image = Cider().compute_score(gts, res)
    metrics["CIDEr"] = float(cider)
    return metrics, {k: float(s) for k, s in zip(keys, per_image)}, "ptb" if use_java else "python"


def diversity(captions: list[str]) -> dict[str, float]:
    """What collapses first when a captioner is tuned for a metric: the share of distinct captions, the number
    of distinct words used, and the mean length in words (after the Python tokenizer)."""
    tokenized = [python_tokenize(c) for c in captions]
    return {"distinct_captions": len(set(tokenized)) / max(len(tokenized), 1),
            "vocabulary": len({w for c in tokenized for w in c.split()}),
            "mean_length": sum(len(c.split()) for c in tokenized) / max(len(tokenized), 1)}


def objects_by_top_label(predictions: dict[str, str], references: dict[str, list[str]],
                         labels: dict[str, list[tuple[str, float]]]) -> dict:
    """Object metrics apart for images whose classifier's top label some reference names ("right") and for the
    rest ("wrong"), so that trusting wrong labels shows. Images without a label are in neither."""
    from capcli.steering.objects import label_is_named, object_metrics

    groups: dict[str, list[str]] = {"right": [], "wrong": []}
    for key in predictions:
        if labels.get(key):
            groups["right" if label_is_named(labels[key][0][0], references[key]) else "wrong"].append(key)
    return {f"objects_top_label_{name}": object_metrics({k: predictions[k] for k in keys}, references)[0]
            for name, keys in groups.items()}


def _thumbnail(path: Path, size: int = 192) -> str:
    from capcli.data.images import open_image

    img = open_image(path)
    img.thumbnail((size, size))
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def write_report(path: Path, rows: list[dict], summary: dict) -> None:
    """A self-contained HTML page: thumbnail, prediction, references and CIDEr per image, worst first."""
    from capcli.files import atomic_write_text
    from capcli.outputs.output import format_labels

    esc = html.escape
    metrics = " &middot; ".join(f"{esc(k)} {v:.3f}" for k, v in summary["metrics"].items())
    objects = summary.get("objects", {})
    metrics += "".join(f" &middot; {esc(k)} {objects[k]:.3f}" for k in ("CHAIR_s", "CHAIR_i", "recall") if k in objects)
    spread = summary.get("diversity", {})
    metrics += "".join(f" &middot; {esc(k.replace('_', ' '))} {spread[k]:.3g}" for k in spread)
    body = []
    for row in sorted(rows, key=lambda r: r["cider"]):
        refs = "".join(f"<li>{esc(r)}</li>" for r in row["references"])
        notes = "".join(f"<div class='{cls}'>{title}: {esc(', '.join(row[key]))}</div>"
                        for key, cls, title in (("wrong_objects", "wrong", "not in the references"),
                                                ("missed_objects", "missed", "missed"))
                        if row.get(key))
        if row.get("labels"):
            notes += f"<div class='path'>labels: {esc(format_labels(row['labels']))}</div>"
        body.append(
            f"<tr><td><img src='{_thumbnail(Path(row['image']))}' alt=''></td>"
            f"<td><b>{esc(row['caption'])}</b>{notes}<div class='path'>{esc(row['image'])}</div></td>"
            f"<td><ul>{refs}</ul></td><td class='num'>{row['cider']:.3f}</td></tr>")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>capcli eval: {esc(str(summary['model']))}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; width: 100%; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 6px; vertical-align: top; text-align: left; }}
img {{ max-width: 192px; max-height: 192px; }}
.path {{ color: #888; font-size: 12px; }} .wrong {{ color: #b00; }} .missed {{ color: #a60; }} .num {{ text-align: right; font-variant-numeric: tabular-nums; }}
ul {{ margin: 0; padding-left: 1.2em; }}
</style></head><body>
<h1>capcli eval</h1>
<p>Model <code>{esc(str(summary['model']))}</code>, {summary['images']} images, tokenizer {esc(summary['tokenizer'])}.</p>
<p>{metrics}</p>
<p>Sorted by per-image CIDEr, worst first.</p>
<table><thead><tr><th>image</th><th>predicted caption</th><th>references</th><th>CIDEr</th></tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table></body></html>
"""
    atomic_write_text(path, page)
