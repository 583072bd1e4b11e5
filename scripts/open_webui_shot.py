"""Screenshot a real Open WebUI showing a chorus pipeline's reasoning stream (the README's pictures).

    .venv/bin/python scripts/open_webui_shot.py --open-webui http://127.0.0.1:18080 --api http://127.0.0.1:18642

Both must be running: `chorus api --port 18642`, and Open WebUI (`pip install open-webui` in a venv of its own,
about 7 GB) started offline against it, without login and without the helper calls it makes after an answer:

    DATA_DIR=/tmp/owdata WEBUI_AUTH=False OFFLINE_MODE=true HF_HUB_OFFLINE=1 ENABLE_OLLAMA_API=False \\
    OPENAI_API_BASE_URL=http://127.0.0.1:18642/v1 OPENAI_API_KEY=unused BYPASS_EMBEDDING_AND_RETRIEVAL=True \\
    ENABLE_TITLE_GENERATION=False ENABLE_TAGS_GENERATION=False ENABLE_FOLLOW_UP_GENERATION=False \\
    ENABLE_AUTOCOMPLETE_GENERATION=False open-webui serve --host 127.0.0.1 --port 18080

Headless Chromium (Debian's, through Playwright) asks the question in a new chat, opens the thinking
block, and saves docs/images/open-webui-thinking.png once the review stage streams, then
docs/images/open-webui-answer.png when the run has ended (chorus's /health shows no run).
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from playwright.sync_api import Page, sync_playwright

REPO = Path(__file__).resolve().parent.parent


def runs(api: str) -> int:
    return int(httpx.get(f"{api}/health", timeout=5).json()["runs"])


def wait_for(page: Page, done: Callable[[], bool], timeout_s: float) -> None:
    """Poll `done()` once a second (the page keeps a socket open: no network-idle to wait for)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError("Open WebUI did not get there in time")
        page.wait_for_timeout(1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--open-webui", default="http://127.0.0.1:18080")
    parser.add_argument("--api", default="http://127.0.0.1:18642", help="the chorus api Open WebUI talks to")
    parser.add_argument("--model", default="chorus/base")
    parser.add_argument("--question", default="Why is the sky blue?")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "chromium",
                                    args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1100, "height": 1000})
        page.goto(f"{args.open_webui}/?models={args.model}", wait_until="load", timeout=180_000)
        page.wait_for_selector("#chat-input", timeout=180_000)
        page.wait_for_timeout(3000)
        page.keyboard.press("Escape")  # the "what's new" dialog of a first start
        page.locator("#chat-input").click()
        page.keyboard.type(args.question)
        page.keyboard.press("Enter")
        start = time.monotonic()
        page.wait_for_selector("text=Thinking", timeout=90_000)
        print(f"thinking block after {time.monotonic() - start:.1f}s")
        page.get_by_text("Thinking").first.click()  # open it
        wait_for(page, lambda: "review ·" in page.inner_text("body"), 600)
        page.wait_for_timeout(3000)
        page.screenshot(path=str(args.out / "open-webui-thinking.png"))
        wait_for(page, lambda: page.get_by_text("Thought for").count() > 0 and runs(args.api) == 0, 600)
        page.wait_for_timeout(4000)
        page.screenshot(path=str(args.out / "open-webui-answer.png"))
        print(f"answer after {time.monotonic() - start:.1f}s; pictures in {args.out}")
        browser.close()


if __name__ == "__main__":
    main()
