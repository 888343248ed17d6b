"""Headless-browser screenshots of the HTML reports, to look at them as a reader would (tests/README.md).

    .venv/bin/python -m pmlm.reports.screenshot out/demo/report.html out/audit/privacy_report.html --out out/shots

writes, per page, NAME.png (the whole page) and, with --tile H, NAME-0.png, NAME-1.png, ... (H pixels each: a
tall page's single PNG is shrunk past reading by most image viewers). It drives Chromium through Playwright when
that is installed (`.venv/bin/pip install playwright`), using the system's `chromium` if there is one (Debian:
`apt-get install chromium`) or Playwright's own (`.venv/bin/python -m playwright install chromium`); without
Playwright it calls `chromium --headless --screenshot` (one PNG of --width x --height, no tiles). Not a runtime
dependency of PMLM: nothing else imports this module.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def with_playwright(pages: list[Path], out: Path, width: int, tile: int) -> list[Path]:
    from playwright.sync_api import sync_playwright  # optional: only screenshots need it (not in the runtime deps)

    written = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium())  # None: Playwright's own Chromium
        page = browser.new_page(viewport={"width": width, "height": 900})
        for html in pages:
            page.goto(html.resolve().as_uri())
            target = out / f"{html.stem}.png"
            page.screenshot(path=str(target), full_page=True)
            written.append(target)
            if tile:
                size = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
                for i, y in enumerate(range(0, size[1], tile)):
                    part = out / f"{html.stem}-{i}.png"
                    page.screenshot(path=str(part), full_page=True,
                                    clip={"x": 0, "y": y, "width": size[0], "height": min(tile, size[1] - y)})
                    written.append(part)
        browser.close()
    return written


def with_chromium_cli(pages: list[Path], out: Path, width: int, height: int) -> list[Path]:
    binary = _chromium()
    if binary is None:
        raise SystemExit("neither Playwright nor a chromium binary is installed (see tests/README.md)")
    written = []
    for html in pages:
        target = out / f"{html.stem}.png"
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            "--no-first-run", f"--user-data-dir={profile}", f"--window-size={width},{height}",
                            f"--screenshot={target}", html.resolve().as_uri()],
                           check=True, capture_output=True, timeout=120)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="+", type=Path, metavar="HTML", help="report pages to photograph")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory for the PNGs")
    parser.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels (default: 1280)")
    parser.add_argument("--height", type=int, default=6000,
                        help="window height without Playwright, which cannot take the whole page (default: 6000)")
    parser.add_argument("--tile", type=int, default=1300,
                        help="also cut each page into PNGs this tall; 0: none (default: 1300)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        import playwright  # noqa: F401
    except ImportError:
        written = with_chromium_cli(args.pages, args.out, args.width, args.height)
    else:
        written = with_playwright(args.pages, args.out, args.width, args.tile)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
