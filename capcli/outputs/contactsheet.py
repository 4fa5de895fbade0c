"""A contact sheet: one self-contained HTML page of thumbnails with their captions and labels.

Thumbnails are small JPEGs embedded as data URIs, so the page can be mailed or archived alone; each links to
its photo. A filter box hides the images whose caption, objects, labels or path do not hold every word typed,
as a whole word ("man" does not find "woman"; "dog" finds "dogs"; text with a dot or slash, such as
"beach.jpg", is found anywhere in the path); `sheet.html#q=dog` opens the page filtered. The images that failed
are listed at the end.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import TextIO

THUMBNAIL_PIXELS = 192  # the longer side
THUMBNAIL_QUALITY = 70

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
header { display: flex; gap: 1em; align-items: baseline; flex-wrap: wrap; }
#q { font-size: 14px; padding: .3em .5em; width: 22em; }
main { display: grid; grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)); gap: 12px; margin-top: 1em; }
figure { margin: 0; padding: 8px; background: #fff; border: 1px solid #ddd; border-radius: 4px; }
figure img { display: block; margin: 0 auto 6px; max-width: 192px; max-height: 192px; }
figcaption p { margin: 0 0 4px; }
.labels { color: #555; font-size: 12px; }
.path { color: #888; font-size: 11px; word-break: break-all; }
.failed { color: #a00; }
"""

SCRIPT = """
const box = document.getElementById('q'), count = document.getElementById('count');
const cards = Array.from(document.querySelectorAll('figure'));
const cardWords = new Map(cards.map(c => [c, c.dataset.text.split(/[^a-z0-9'-]+/)]));
function found(card, w) {
  if (/[^a-z0-9'-]/.test(w)) return card.dataset.text.includes(w);
  const plurals = [w, w + 's', w + 'es', w.endsWith('y') ? w.slice(0, -1) + 'ies' : w];
  return cardWords.get(card).some(x => plurals.includes(x));
}
function filter() {
  const words = box.value.toLowerCase().split(/\\s+/).filter(Boolean);
  let shown = 0;
  for (const card of cards) {
    const hit = words.every(w => found(card, w));
    card.hidden = !hit; shown += hit;
  }
  count.textContent = shown + ' of ' + cards.length + ' images';
}
box.addEventListener('input', filter);
const given = new URLSearchParams(location.hash.slice(1)).get('q');
if (given) box.value = given;
filter();
"""


def thumbnail_uri(image: Path) -> str | None:
    """A small JPEG of the image as a data URI, or None if it cannot be read now."""
    from capcli.data.images import open_image
    from capcli.errors import InputError

    try:
        img = open_image(image)
    except InputError:
        return None
    img.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=THUMBNAIL_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class ContactSheet:
    """Collects one card per image and the failures; `close()` writes the whole page to the stream."""

    def __init__(self, stream: TextIO, title: str = "capcli captions"):
        self.stream, self.title = stream, title
        self.cards: list[str] = []
        self.failures: list[str] = []

    def write(self, image: Path, captions: list[str], labels: list[tuple[str, float]] | None = None,
              neighbours: list | None = None, objects: list | None = None) -> None:
        from capcli.outputs.output import format_labels, format_objects

        uri = thumbnail_uri(image)
        shown = "; ".join(x for x in (format_objects(objects or []), format_labels(labels or [])) if x)
        text = " ".join([*captions, shown, str(image)]).lower()
        link = html.escape(Path(image).resolve().as_uri())
        picture = f'<a href="{link}"><img src="{uri}" alt="{html.escape(captions[0])}"></a>' if uri else ""
        lines = "".join(f"<p>{html.escape(c)}</p>" for c in captions)
        label_line = f'<p class="labels">{html.escape(shown)}</p>' if shown else ""
        self.cards.append(f'<figure data-text="{html.escape(text)}">{picture}<figcaption>{lines}{label_line}'
                          f'<p class="path">{html.escape(str(image))}</p></figcaption></figure>')

    def fail(self, message: str, image: Path | None = None) -> None:
        self.failures.append(message)

    def close(self) -> None:
        failed = ""
        if self.failures:
            items = "".join(f"<li>{html.escape(m)}</li>" for m in self.failures)
            failed = f'<section class="failed"><h2>{len(self.failures)} failed</h2><ul>{items}</ul></section>'
        page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{html.escape(self.title)}</title><style>{STYLE}</style></head><body>"
                f'<header><h1>{html.escape(self.title)}</h1><input id="q" type="search" '
                f'placeholder="filter: words in captions, labels, paths" aria-label="filter">'
                f'<span id="count"></span></header><main>{"".join(self.cards)}</main>{failed}'
                f"<script>{SCRIPT}</script></body></html>\n")
        self.stream.write(page)
        self.stream.flush()
