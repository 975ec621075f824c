// Linked selection across the Embedding space maps (#baseline-plot, #adapted-plot, #move-plot).
// Every point carries customdata "i:<image row>" or "t:<caption row>". A click or a box/lasso
// selection in one map highlights the same items in all three, and the ids are sent to the server
// through the hidden #map-pick textbox (its input event runs harma_app.tab_embedding_space.show_pick).
(function () {
  const MAPS = ["#baseline-plot", "#adapted-plot", "#move-plot"];

  function plots() {
    return MAPS.map((sel) => document.querySelector(sel + " .js-plotly-plot")).filter(Boolean);
  }

  function highlight(ids) {
    const wanted = new Set(ids);
    for (const gd of plots()) {
      const selected = gd.data.map((trace) =>
        (trace.customdata || []).map((c, k) => (wanted.has(c) ? k : -1)).filter((k) => k >= 0));
      window.Plotly.restyle(gd, { selectedpoints: selected.map((s) => (ids.length ? s : null)) });
    }
  }

  function send(kind, ids) {
    const box = document.querySelector("#map-pick textarea, #map-pick input");
    if (!box) return;
    box.value = JSON.stringify({ kind: kind, ids: ids, t: Date.now() });
    box.dispatchEvent(new Event("input", { bubbles: true }));
  }

  function attach() {
    for (const gd of plots()) {
      if (gd.__harmaLinked || !gd.on) continue;
      gd.__harmaLinked = true;
      gd.on("plotly_click", (ev) => {
        const ids = (ev.points || []).map((p) => p.customdata).filter(Boolean).slice(0, 1);
        highlight(ids);
        send("click", ids);
      });
      gd.on("plotly_selected", (ev) => {
        const ids = [...new Set(((ev && ev.points) || []).map((p) => p.customdata).filter(Boolean))];
        highlight(ids);
        send("select", ids);
      });
    }
  }

  setInterval(attach, 500);  // maps are redrawn whenever the tab updates
})();
