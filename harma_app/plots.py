"""The embedding-space plot: a cached 2-D UMAP projection of a retriever's embeddings and its plotly figure
(plotly is imported when a figure is drawn, not with the app)."""

from __future__ import annotations

from pathlib import Path

from harma.projection import embedding_projection
from harma.retrieval import Retriever

from .galleries import Gallery


def projection(r: Retriever, gallery: Gallery, max_points: int, cache_dir: Path, seed: int = 0) -> dict:
    """2-D UMAP of a seeded sample (<= max_points per modality) and modality-gap numbers on all embeddings,
    cached on disk (:func:`harma.projection.embedding_projection`)."""
    pool = gallery.pool if r.captions is not None else None
    return embedding_projection(
        r.images.embeddings, r.captions.embeddings if r.captions is not None else None,
        caption_rows=pool.caption_to_text if pool else None,
        text_to_image=gallery.split.text_to_image if pool else None,
        max_points=max_points, cache_dir=cache_dir, seed=seed)


def figure(view: dict, r: Retriever, gallery: Gallery):
    """Images (blue) and captions (orange) of a :func:`projection`, named on hover."""
    import plotly.graph_objects as go

    n = len(view["img_rows"])
    xy = view["xy"]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[p[0] for p in xy[:n]], y=[p[1] for p in xy[:n]], mode="markers", name="images",
                             marker=dict(size=6, color="#2563eb", opacity=0.75), hoverinfo="text",
                             hovertext=[gallery.images[i].name for i in view["img_rows"]]))
    if view["txt_rows"]:
        fig.add_trace(go.Scatter(x=[p[0] for p in xy[n:]], y=[p[1] for p in xy[n:]], mode="markers", name="captions",
                                 marker=dict(size=6, color="#f97316", opacity=0.75), hoverinfo="text",
                                 hovertext=[r.captions.metadata[j]["caption"][:120] for j in view["txt_rows"]]))
    fig.update_layout(height=440, margin=dict(l=10, r=10, t=40, b=10), template="plotly_white",
                      legend=dict(orientation="h", y=-0.05), xaxis=dict(showticklabels=False, title=None),
                      yaxis=dict(showticklabels=False, title=None))
    return fig
