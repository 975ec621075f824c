// Linked selection across the Embedding space maps (#baseline-plot, #adapted-plot, #move-plot).
// Every point carries customdata "i:<image row>" or "t:<caption row>". A click or a box/lasso
// selection in one map highlights the same items in all three, and the ids are sent to the server
// through the hidden #map-pick textbox (its input event runs harma_app.tab_embedding_space.show_pick).
// Hovering an image point shows its thumbnail: layout.meta.thumbs maps "i:<row>" to a file the app
// serves (harma_app.tab_embedding_space.hover_thumbnails).
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

  function thumbnail() {
    let img = document.getElementById("harma-hover");
    if (!img) {
      img = document.createElement("img");
      img.id = "harma-hover";
      img.alt = "";
      img.style.cssText = "position:fixed;z-index:1000;width:128px;height:128px;object-fit:cover;display:none;" +
        "pointer-events:none;border:2px solid #fff;border-radius:4px;box-shadow:0 2px 10px rgba(0,0,0,.35)";
      document.body.appendChild(img);
    }
    return img;
  }

  function fileUrl(path) {
    const root = (window.gradio_config && window.gradio_config.root) || "";
    return (root ? root.replace(/\/$/, "") + "/" : "") + "gradio_api/file=" + encodeURI(path);
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
      gd.on("plotly_hover", (ev) => {
        const p = (ev.points || [])[0];
        const path = p && ((gd.layout.meta || {}).thumbs || {})[p.customdata];
        const img = thumbnail();
        if (!path) { img.style.display = "none"; return; }
        const e = ev.event || {};
        const src = fileUrl(path);
        if (img.getAttribute("src") !== src) img.setAttribute("src", src);
        img.dataset.item = p.customdata;
        img.style.left = Math.min((e.clientX || 0) + 16, window.innerWidth - 140) + "px";
        img.style.top = Math.min((e.clientY || 0) + 16, window.innerHeight - 140) + "px";
        img.style.display = "block";
      });
      gd.on("plotly_unhover", () => { thumbnail().style.display = "none"; });
      gd.on("plotly_selected", (ev) => {
        const ids = [...new Set(((ev && ev.points) || []).map((p) => p.customdata).filter(Boolean))];
        highlight(ids);
        send("select", ids);
      });
    }
  }

  setInterval(attach, 500);  // maps are redrawn whenever the tab updates
})();
