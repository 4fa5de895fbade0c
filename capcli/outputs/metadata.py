"""Captions as photo metadata: XMP sidecars (written here) and descriptions embedded in the image (by exiftool).

Photo managers (digiKam, darktable, Lightroom, exiftool) read the caption from XMP `dc:description` and the
label nouns from `dc:subject`. Embedding goes through exiftool, the reference tool for image metadata: it
edits only the metadata segments (pixels untouched), keeps all other metadata, writes JPEG, PNG, WebP,
TIFF and more, and replaces the file by renaming a complete temporary copy over it (`-overwrite_original`).
It runs as a separate program, so its licence does not extend to capcli.
"""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from capcli.errors import CapcliError, InputError
from capcli.files import atomic_write_bytes

NS = {"x": "adobe:ns:meta/", "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
      "dc": "http://purl.org/dc/elements/1.1/", "xml": "http://www.w3.org/XML/1998/namespace"}
for _prefix, _uri in NS.items():
    if _prefix != "xml":
        ET.register_namespace(_prefix, _uri)

EXIFTOOL_HINT = ("--embed needs exiftool (https://exiftool.org): apt install libimage-exiftool-perl, "
                 "brew install exiftool, or put exiftool on PATH")


def _q(name: str) -> str:
    prefix, local = name.split(":")
    return f"{{{NS[prefix]}}}{local}"


def xmp_packet(description: str, subjects: list[str] = ()) -> bytes:
    """A complete XMP packet: dc:description (language x-default) and, if any, dc:subject as a bag."""
    meta = ET.Element(_q("x:xmpmeta"))
    rdf = ET.SubElement(meta, _q("rdf:RDF"))
    about = ET.SubElement(rdf, _q("rdf:Description"), {_q("rdf:about"): ""})
    alt = ET.SubElement(ET.SubElement(about, _q("dc:description")), _q("rdf:Alt"))
    ET.SubElement(alt, _q("rdf:li"), {_q("xml:lang"): "x-default"}).text = description
    if subjects:
        bag = ET.SubElement(ET.SubElement(about, _q("dc:subject")), _q("rdf:Bag"))
        for subject in subjects:
            ET.SubElement(bag, _q("rdf:li")).text = subject
    ET.indent(meta, " ")
    body = ET.tostring(meta, encoding="unicode")
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n' + body +
            '\n<?xpacket end="w"?>\n').encode("utf-8")


def read_xmp(packet: bytes | str) -> tuple[str | None, list[str]]:
    """(dc:description's x-default text or first entry, dc:subject entries) of an XMP packet."""
    text = packet.decode("utf-8", "replace") if isinstance(packet, bytes) else packet
    start, end = text.find("<x:xmpmeta"), text.rfind("</x:xmpmeta>")
    try:
        root = ET.fromstring(text[start:end + len("</x:xmpmeta>")] if start >= 0 and end >= 0 else text)
    except ET.ParseError:
        return None, []
    descriptions = root.findall(".//dc:description//rdf:li", NS)
    chosen = next((li for li in descriptions if li.get(_q("xml:lang")) == "x-default"),
                  descriptions[0] if descriptions else None)
    subjects = [li.text or "" for li in root.findall(".//dc:subject//rdf:li", NS)]
    return (chosen.text if chosen is not None else None), subjects


def write_xmp_sidecar(path: Path, description: str, subjects: list[str] = ()) -> None:
    atomic_write_bytes(path, xmp_packet(description, subjects))


def has_description(image: Path) -> bool:
    """Whether the image file already holds a description (XMP dc:description or EXIF ImageDescription).
    Reads the metadata only; an unreadable file counts as having none (the write will report it)."""
    from PIL import Image

    try:
        with Image.open(image) as img:
            packet = img.info.get("xmp") or img.info.get("XML:com.adobe.xmp")
            if packet and (read_xmp(packet)[0] or "").strip():
                return True
            return bool(str(img.getexif().get(270) or "").strip())
    except Exception:  # noqa: BLE001 - any unreadable file: let exiftool say what is wrong
        return False


def require_exiftool() -> str:
    exiftool = shutil.which("exiftool")
    if exiftool is None:
        raise CapcliError(EXIFTOOL_HINT)
    return exiftool


def embed(image: Path, description: str, subjects: list[str] = (), exiftool: str | None = None) -> None:
    """Write the description (and subjects) into the image file: XMP dc:description and dc:subject, and
    EXIF ImageDescription where the format has EXIF. Raises InputError if exiftool cannot write the file."""
    exiftool = exiftool or require_exiftool()
    tags = [f"-XMP-dc:Description={description}", "-XMP-dc:Subject="]
    tags += [f"-XMP-dc:Subject={subject}" for subject in subjects]
    if image.suffix.lower() in (".jpg", ".jpeg", ".tif", ".tiff", ".webp"):
        tags.append(f"-EXIF:ImageDescription={description}")
    # -P keeps the file's modification time (photo managers sort by it); -m lets minor warnings pass.
    command = [exiftool, "-q", "-q", "-m", "-P", "-overwrite_original", "-charset", "filename=utf8", *tags,
               str(image.resolve())]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["exiftool failed"])[0].removeprefix("Error: ")
        raise InputError(image, f"cannot embed the caption ({reason.split(' - ')[0]})")
