"""The embedded default corpus: the English text of *The Debian Administrator's Handbook*.

No machine here reaches a dataset hub, but Debian's package archive is reachable. The
``debian-handbook`` package (version pinned below, CC-BY-SA/GPL-2+) ships the book as HTML; we
fetch it with ``apt-get download`` (nothing is installed), unpack it with ``dpkg-deb -x``, and
keep the running prose (DocBook ``para`` blocks, code listings dropped) as one JSON line per
chapter page. ``lens corpus`` prepares it; training prepares it on first use.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

from lens.artifacts.files import atomic_path, cache_dir
from lens.config import DEFAULT_CORPUS

PACKAGE = DEFAULT_CORPUS
VERSION = "11.20220922"
HTML_DIR = "usr/share/doc/debian-handbook/html/en-US"


def default_corpus_path() -> Path:
    return cache_dir() / f"{PACKAGE}_{VERSION}.jsonl"


class _ParaText(HTMLParser):
    """Collect the text of DocBook paragraphs (``<div class="para">`` or ``<p>``), skipping code."""

    def __init__(self) -> None:
        super().__init__()
        self.paragraphs: list[str] = []
        self._stack: list[bool] = []  # one entry per open div/p: is it a paragraph?
        self._skip = 0
        self._buf: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("pre", "script", "style"):
            self._skip += 1
        elif tag in ("div", "p"):
            classes = dict(attrs).get("class") or ""
            self._stack.append(tag == "p" or "para" in classes.split())

    def handle_endtag(self, tag: str) -> None:
        if tag in ("pre", "script", "style"):
            self._skip -= 1
        elif tag in ("div", "p") and self._stack:
            if self._stack.pop() and not any(self._stack):
                text = " ".join("".join(self._buf).split())
                self._buf = []
                if len(text.split()) >= 5:
                    self.paragraphs.append(text)

    def handle_data(self, data: str) -> None:
        if any(self._stack) and not self._skip:
            self._buf.append(data)


def html_to_paragraphs(html: str) -> list[str]:
    parser = _ParaText()
    parser.feed(html)
    return parser.paragraphs


def _apt_download(workdir: Path) -> Path:
    cmd = ["apt-get", "download", f"{PACKAGE}={VERSION}"]
    for attempt in range(2):
        result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
        debs = list(workdir.glob(f"{PACKAGE}_*.deb"))
        if result.returncode == 0 and debs:
            return debs[0]
        if attempt == 0:  # a fresh machine may have no package lists yet
            subprocess.run(["apt-get", "update"], capture_output=True)
    raise RuntimeError(
        f"could not fetch {PACKAGE}={VERSION} with `apt-get download`: {result.stderr.strip()}\n"
        "Run it by hand (after `apt-get update`) and pass the unpacked HTML folder, or set "
        "data.dataset to a local text file."
    )


def prepare_default_corpus(force: bool = False) -> Path:
    """Download, unpack and extract the default corpus once; return the JSONL path."""
    out = default_corpus_path()
    if out.is_file() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        deb = _apt_download(work)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "x")], check=True)
        pages = sorted((work / "x" / HTML_DIR).glob("*.html"))
        if not pages:
            raise RuntimeError(f"{deb.name} holds no English HTML under {HTML_DIR}")
        with atomic_path(out) as partial, partial.open("w", encoding="utf-8") as f:
            for page in pages:
                paragraphs = html_to_paragraphs(page.read_text(encoding="utf-8"))
                if paragraphs:
                    doc = {"source": page.name, "text": "\n\n".join(paragraphs)}
                    f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    return out


def describe(path: Path) -> str:
    """One line on the prepared corpus: where it is, documents, characters."""
    docs = path.read_text(encoding="utf-8").splitlines()
    chars = sum(len(json.loads(line)["text"]) for line in docs)
    return f"{path}: {len(docs)} documents, {chars:,} characters"
