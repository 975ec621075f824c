// The Embedding space maps (#baseline-plot, #adapted-plot, #move-plot), linked in the page.
// Every point carries customdata "i:<image row>" or "t:<caption row>" (harma_app/plots.py).
// - A click or a box/lasso selection in one map highlights the same items in all three, clears the
//   selection outlines of the others, and sends the ids to the server through the hidden #map-pick
//   textbox (its input event runs harma_app.tab_embedding_space.show_pick).
// - Hovering a point rings the same item on the other maps (the "harma-ring" trace) and shows an
//   image's thumbnail: layout.meta.thumbs maps "i:<row>" to a file the app serves.
// - Zooming or panning one map sets the same axis ranges on the others (guarded against loops).
// - The move map's "play" button (a plotly "skip" button) runs Plotly.animate from the baseline places
//   to the adapted ones (layout.meta.move), and back: Gradio's Plotly.react drops figure frames.
// - window.harmaSearch(json) highlights the ids the map search found, per map.
(function () {
  const MAPS = ["#baseline-plot", "#adapted-plot", "#move-plot"];
  const RING = "harma-ring";
  let syncing = false;  // true while this script relayouts the other maps (their events are not re-sent)
  let picked = null;  // the clicked item, kept ringed

  function plots() {
    return MAPS.map((sel) => document.querySelector(sel + " .js-plotly-plot")).filter(Boolean);
  }

  function mapName(gd) {
    const box = gd.closest("[id]") && gd.closest("#baseline-plot, #adapted-plot, #move-plot");
    return box ? box.id : "";
  }

  function highlight(ids, only) {
    const wanted = new Set(ids);
    for (const gd of only || plots()) {
      const idx = [], selected = [];
      gd.data.forEach((trace, k) => {
        if (trace.name === RING || !trace.customdata || trace.mode === "lines") return;
        idx.push(k);
        selected.push(ids.length ? trace.customdata.map((c, j) => (wanted.has(c) ? j : -1)).filter((j) => j >= 0) : null);
      });
      if (idx.length) window.Plotly.restyle(gd, { selectedpoints: selected }, idx);
    }
  }

  function ring(id, except) {
    for (const gd of plots()) {
      if (gd === except) continue;
      const k = gd.data.findIndex((t) => t.name === RING);
      if (k < 0) continue;
      let x = [], y = [];
      if (id) {
        for (const t of gd.data) {
          if (t.name === RING || t.mode === "lines" || !t.customdata) continue;
          const j = t.customdata.indexOf(id);
          if (j >= 0) { x = [t.x[j]]; y = [t.y[j]]; break; }
        }
      }
      const old = gd.data[k].x || [];
      if (old.length === x.length && (x.length === 0 || (old[0] === x[0] && gd.data[k].y[0] === y[0]))) continue;
      window.Plotly.restyle(gd, { x: [x], y: [y] }, [k]);
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

  async function others(gd, update) {  // the same layout update on every other map, without echo
    syncing = true;
    try {
      await Promise.all(plots().filter((o) => o !== gd).map((o) => window.Plotly.relayout(o, update)));
    } finally {
      syncing = false;
    }
  }

  function linkZoom(gd, ev) {
    if (syncing || !ev) return;
    const update = {};
    for (const ax of ["xaxis", "yaxis"]) {
      if (ev[ax + ".range[0]"] !== undefined) update[ax + ".range"] = [ev[ax + ".range[0]"], ev[ax + ".range[1]"]];
      else if (ev[ax + ".range"]) update[ax + ".range"] = ev[ax + ".range"];
      else if (ev[ax + ".autorange"]) update[ax + ".range"] = gd.layout[ax].range.slice();
    }
    if (Object.keys(update).length) others(gd, update);
  }

  function at(move, t, which) {  // each moving trace's x or y at t (0 = baseline, 1 = adapted)
    return move.traces.map((_, k) => move.base[k][which].map((b, j) => {
      const a = move.adapted[k][which][j];
      return b === null || a === null ? null : (1 - t) * b + t * a;
    }));
  }

  function arrowAt(move, t) {
    const out = {};
    for (const c of ["x", "y", "ax", "ay"]) out["annotations[0]." + c] = (1 - t) * move.arrow[0][c] + t * move.arrow[1][c];
    return out;
  }

  // Moves the move map to t in [0, 1] at once (tests and a fallback for play).
  window.harmaMove = function (t) {
    const gd = document.querySelector("#move-plot .js-plotly-plot");
    const move = gd && gd.layout.meta && gd.layout.meta.move;
    if (!move) return Promise.resolve(false);
    return window.Plotly.update(gd, { x: at(move, t, 0), y: at(move, t, 1) }, arrowAt(move, t), move.traces)
      .then(() => true);
  };

  async function play(gd) {
    const move = gd.layout.meta && gd.layout.meta.move;
    if (!move || gd.__harmaPlaying) return;
    gd.__harmaPlaying = true;
    const last = ((gd.layout.sliders || [{}])[0].steps || []).length - 1;
    const to = gd.__harmaAt === 1 ? 0 : 1;  // play again: back to the baseline
    ring(null);
    try {
      const data = move.traces.map((_, k) => ({ x: at(move, to, 0)[k], y: at(move, to, 1)[k] }));
      await window.Plotly.animate(gd, { data: data, traces: move.traces },
        { transition: { duration: 1600, easing: "cubic-in-out" }, frame: { duration: 1600, redraw: false }, mode: "immediate" });
    } catch (e) {
      await window.harmaMove(to);
    }
    await window.Plotly.relayout(gd, Object.assign(arrowAt(move, to), { "sliders[0].active": to === 1 ? last : 0 }));
    gd.__harmaAt = to;
    gd.__harmaPlaying = false;
  }

  window.harmaSearch = function (json) {
    let hits = {};
    try { hits = JSON.parse(json || "{}"); } catch (e) { hits = {}; }
    for (const gd of plots()) highlight(hits[mapName(gd)] || [], [gd]);
  };

  function attach() {
    for (const gd of plots()) {
      if (gd.__harmaLinked || !gd.on) continue;
      gd.__harmaLinked = true;
      gd.on("plotly_click", (ev) => {
        const ids = (ev.points || []).map((p) => p.customdata).filter((c) => typeof c === "string").slice(0, 1);
        picked = ids[0] || null;
        highlight(ids);
        ring(picked);
        send("click", ids);
      });
      gd.on("plotly_hover", (ev) => {
        const p = (ev.points || [])[0];
        const id = p && typeof p.customdata === "string" ? p.customdata : null;
        if (id) ring(id, gd);
        const path = id && ((gd.layout.meta || {}).thumbs || {})[id];
        const img = thumbnail();
        if (!path) { img.style.display = "none"; return; }
        const e = ev.event || {};
        const src = fileUrl(path);
        if (img.getAttribute("src") !== src) img.setAttribute("src", src);
        img.dataset.item = id;
        img.style.left = Math.min((e.clientX || 0) + 16, window.innerWidth - 140) + "px";
        img.style.top = Math.min((e.clientY || 0) + 16, window.innerHeight - 140) + "px";
        img.style.display = "block";
      });
      gd.on("plotly_unhover", () => { thumbnail().style.display = "none"; ring(picked); });
      gd.on("plotly_selected", (ev) => {
        const ids = [...new Set(((ev && ev.points) || []).map((p) => p.customdata).filter((c) => typeof c === "string"))];
        highlight(ids);
        others(gd, { selections: [] });  // an old lasso or box outline on another map is cleared
        send("select", ids);
      });
      gd.on("plotly_relayout", (ev) => linkZoom(gd, ev));
      gd.on("plotly_buttonclicked", (ev) => {
        if (ev && ev.button && /play/.test(ev.button.label || "")) play(gd);
      });
      gd.on("plotly_sliderchange", (ev) => {
        const steps = (gd.layout.sliders || [{}])[0].steps || [];
        const k = ev && ev.step ? (typeof ev.step._index === "number" ? ev.step._index : steps.indexOf(ev.step)) : -1;
        if (k >= 0 && steps.length > 1) gd.__harmaAt = k / (steps.length - 1);
      });
    }
  }

  window.addEventListener("resize", () => {
    for (const gd of plots()) if (window.Plotly && window.Plotly.Plots) window.Plotly.Plots.resize(gd);
  });
  setInterval(attach, 500);  // maps are redrawn whenever the tab updates
})();
