"""Gradio's floor for ``benchmarks.app_archive --floor``: a bare page with the app's query box, galleries and
status line (the same element ids, progress on the status line) whose answer takes no time: the 8 + 8 demo
images after the query's position in the demo gallery, and a status in the app's words.

    python -m benchmarks.gradio_floor --port 7860
"""

from __future__ import annotations

import argparse
import os
import zlib
from typing import Optional

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from harma_app.common import DEMO  # noqa: E402


def build() -> gr.Blocks:
    images = sorted(str(p) for p in (DEMO / "images").iterdir())

    def answer(query: str, k: float) -> tuple[list, list, str]:
        k = int(k)
        start = zlib.crc32(query.encode()) % (len(images) - 2 * k)
        tiles = [(path, f"#{i % k + 1}") for i, path in enumerate(images[start:start + 2 * k])]
        return tiles[:k], tiles[k:], f"Top {k} for “{query}” — baseline 0 ms, adapted 0 ms."

    with gr.Blocks() as demo:
        query = gr.Textbox(label="Query", elem_id="query")
        k = gr.Number(value=8, label="k")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            base = gr.Gallery(columns=4, elem_id="baseline-gallery")
            adapted = gr.Gallery(columns=4, elem_id="adapted-gallery")
        query.submit(answer, [query, k], [base, adapted, status], api_name="search_text", show_progress_on=[status])
    return demo


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gradio_floor", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=7860)
    args = p.parse_args(argv)
    gr.set_static_paths([str(DEMO / "images")])  # served where they are, as the app's display copies are
    build().queue().launch(server_name="127.0.0.1", server_port=args.port, quiet=True)


if __name__ == "__main__":
    main()
