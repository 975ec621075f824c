"""HarMA demo: remote-sensing image-text retrieval, the frozen backbone (baseline) next to the adapted model.

Tabs: text -> image, image -> text, the embedding space (UMAP + modality-gap numbers) and the R@K table.

    python app.py --data /path/to/ucm                 # a dataset folder in any supported format (or HARMA_DATA)
    python app.py --checkpoint runs/x/best --data D   # any adapter directory (or HARMA_CHECKPOINT)
    python app.py --checkpoint C --index indexes/A    # an image folder indexed by python -m training.build_index

The entry point (what a Hugging Face Space runs); the app itself is the ``harma_app`` package. Importing this
file loads no model, builds no UI and makes no network call; ``app.demo`` (for ``gradio app.py`` and other
hosts that look for it) is built from the ``HARMA_*`` variables on first access.
"""

from __future__ import annotations

from typing import Any

from harma_app import build_demo, main

__all__ = ["build_demo", "main"]


def __getattr__(name: str) -> Any:
    if name == "demo":
        globals()["demo"] = demo = build_demo()
        return demo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
