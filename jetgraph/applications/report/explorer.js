// jetgraph explorer: reads the JSON embedded in this page and draws each result; no network.
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("jetgraph-data").textContent);
  const tip = document.getElementById("tooltip");
  const el = (tag, attrs, ...kids) => {
    const svg = ["svg", "g", "path", "rect", "circle", "text", "line", "title"].includes(tag);
    const node = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "on") for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn);
      else node.setAttribute(k, v);
    }
    for (const kid of kids) node.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    return node;
  };
  const fmt = (x, d = 3) => (x === null || x === undefined || Number.isNaN(x)) ? "—"
    : Number.isInteger(x) ? String(x) : Number(x).toPrecision(d);
  const pct = (x) => (x === null || Number.isNaN(x)) ? "—" : (100 * x).toFixed(1) + "%";
  const showTip = (ev, html) => {  // beside the pointer, kept inside the window
    tip.innerHTML = html; tip.style.display = "block";
    const w = tip.offsetWidth, h = tip.offsetHeight;
    const left = ev.clientX + 14 + w > window.innerWidth ? ev.clientX - w - 10 : ev.clientX + 14;
    const top = ev.clientY + 10 + h > window.innerHeight ? Math.max(4, window.innerHeight - h - 4) : ev.clientY + 10;
    tip.style.left = Math.max(4, left) + "px"; tip.style.top = top + "px"; };
  const hideTip = () => { tip.style.display = "none"; };
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
  // a token's leading/trailing spaces made visible (HTML would collapse them): " Paris" -> "␣Paris"
  const vis = (t) => String(t).replace(/^ /, "␣").replace(/ $/, "␣");

  // ------------------------------------------------------------------ lens: layers × positions
  function lensView(view, root) {
    let order = 0, colour = "own";
    const controls = el("div", {class: "controls"});
    const orderSelect = el("select", {id: "lens-order", on: {change: (e) => { order = +e.target.value; draw(); }}},
      ...view.orders.map((o, i) => el("option", {value: i}, o.name)));
    const colourSelect = el("select", {id: "lens-colour", on: {change: (e) => { colour = e.target.value; draw(); }}},
      el("option", {value: "own"}, "probability of the model's own next token"),
      el("option", {value: "cos"}, "cosine to the model's logits"));
    controls.append(el("label", {}, "order ", orderSelect), el("label", {}, "colour ", colourSelect));
    const grid = el("div", {});
    root.append(controls, grid);
    function draw() {
      hideTip();
      const o = view.orders[order];
      const table = el("table", {class: "grid", id: "lens-grid"});
      table.append(el("tr", {}, el("th", {}, "state \\ token"), ...view.tokens.map((t, p) => el("th", {title: "position " + p}, vis(t)))));
      o.cells.forEach((row, s) => {
        const tr = el("tr", {}, el("th", {}, o.labels[s]));
        row.forEach((cell, p) => {
          const value = colour === "own" ? cell.own : Math.max(0, cell.cos);
          const shade = Number.isFinite(value) ? value : 0;
          const td = el("td", {class: "cell" + (cell.diverged || cell.divergent ? " diverged" : ""),
            style: `background: rgba(40, 110, 220, ${shade.toFixed(3)}); color: ${shade > 0.55 ? "#fff" : "#222"}`,
            on: {mousemove: (ev) => showTip(ev, `<b>${esc(o.labels[s])}</b>, position ${p} (${esc(vis(view.tokens[p]))})<br>` +
              (cell.diverged ? "<b style='color:#c00'>non-finite lens logits</b><br>"
                : cell.divergent ? "<b style='color:#c00'>the jet's series diverges here: read with care</b><br>" : "") +
              cell.top.map(([t, pr]) => `${esc(vis(t))} <span class=num>${pct(pr)}</span>`).join("<br>") +
              `<br><span class=muted>rest ${pct(cell.rest)}; model's own next token ${esc(vis(view.next[p]))}: ${pct(cell.own)}; cosine ${fmt(cell.cos)}</span>`),
              mouseleave: hideTip}}, cell.top.length ? vis(cell.top[0][0]) : "·");
          tr.append(td);
        });
        table.append(tr);
      });
      grid.replaceChildren(table);
    }
    draw();
    if (view.curves) root.append(curvesChart(view.curves));
  }

  function curvesChart(curves) {
    const w = 900, h = 340, left = 46, right = 20, top = 30, bottom = 40;
    const n = curves.labels.length;
    const all = curves.series.flatMap((s) => s.low.concat(s.high, s.mean));
    const low = Math.min(0, ...all) < 0 ? -1 : 0, high = 1;
    const x = (i) => left + (w - left - right) * i / Math.max(1, n - 1);
    const y = (v) => top + (h - top - bottom) * (high - Math.max(low, Math.min(high, v))) / (high - low);
    const svg = el("svg", {width: w, height: h, id: "lens-curves"});
    for (let t = low; t <= high + 1e-9; t += 0.5) {
      svg.append(el("line", {x1: left, y1: y(t), x2: w - right, y2: y(t), stroke: t === 0 ? "#999" : "#e3e3e3"}));
      svg.append(el("text", {x: left - 6, y: y(t) + 4, "text-anchor": "end", "font-size": 11}, t.toFixed(1)));
    }
    const step = Math.max(1, Math.ceil(n / 16));
    curves.labels.forEach((label, i) => { if (i % step === 0 || i === n - 1)
      svg.append(el("text", {x: x(i), y: h - bottom + 16, "text-anchor": "middle", "font-size": 11}, label)); });
    const colours = ["#2666d0", "#d0662a", "#2a9d4b", "#8a3fc0"];
    curves.series.forEach((serie, k) => {
      const c = colours[k % colours.length];
      const band = serie.low.map((v, i) => `${x(i)},${y(v)}`).concat(serie.high.map((v, i) => `${x(i)},${y(v)}`).reverse());
      svg.append(el("path", {class: "band", d: "M" + band.join("L") + "Z", fill: c, opacity: 0.14}));
      svg.append(el("path", {class: "mean", d: "M" + serie.mean.map((v, i) => `${x(i)},${y(v)}`).join("L"), stroke: c, fill: "none", "stroke-width": 2}));
      svg.append(el("rect", {x: left + 10 + 150 * k, y: 8, width: 14, height: 10, fill: c}));
      svg.append(el("text", {x: left + 28 + 150 * k, y: 17, "font-size": 12}, serie.name));
    });
    curves.labels.forEach((label, i) => svg.append(el("rect", {x: x(i) - (w - left - right) / (2 * Math.max(1, n - 1)), y: top,
      width: (w - left - right) / Math.max(1, n - 1), height: h - top - bottom, fill: "transparent",
      on: {mousemove: (ev) => showTip(ev, `<b>${esc(label)}</b><br>` + curves.series.map((s) =>
        `${esc(s.name)}: ${fmt(s.mean[i])} [${fmt(s.low[i])}, ${fmt(s.high[i])}]`).join("<br>")), mouseleave: hideTip}})));
    return el("div", {}, el("h3", {}, curves.title), svg);
  }

  // ------------------------------------------------------------------ path attribution graph
  function attributionView(view, root) {
    const total = view.paths.reduce((a, p) => a + Math.abs(p.contribution), 0) || 1;
    let share = 0.8, selected = null;
    const info = el("div", {class: "muted"});
    const slider = el("input", {type: "range", min: 1, max: 100, value: 80, id: "attr-share",
      on: {input: (e) => { share = e.target.value / 100; draw(); }}});
    const shareText = el("span", {id: "attr-share-text"});
    root.append(el("div", {class: "controls"}, el("label", {}, "show the largest paths until they carry ", slider, " ", shareText,
      " of Σ|contribution| of the listed paths"), info));
    const graph = el("div", {class: "graph"}), side = el("div", {class: "side", id: "attr-side"});
    root.append(el("div", {class: "panel"}, graph, side));
    const nodes = view.nodes, W = view.width, H = view.height;
    function kept() {
      const out = []; let acc = 0;
      for (const p of view.paths) { if (acc >= share * total && out.length) break; out.push(p); acc += Math.abs(p.contribution); }
      return out;
    }
    function draw() {
      const paths = kept();
      shareText.textContent = `${Math.round(share * 100)}% (${paths.length} of ${view.paths.length} paths)`;
      const edges = new Map();
      for (const p of paths) for (let i = 0; i + 1 < p.nodes.length; i++) {
        const key = p.nodes[i] + "|" + p.nodes[i + 1];
        edges.set(key, (edges.get(key) || 0) + p.contribution);
      }
      const biggest = Math.max(1e-12, ...[...edges.values()].map(Math.abs));
      for (const extra of view.extra || []) edges.set(extra.from + "|target", extra.value);
      const through = selected ? new Set(paths.filter((p) => p.nodes.includes(selected)).flatMap((p) => p.nodes)) : null;
      // scaled to the window, but never below 70% (labels stay readable; the panel scrolls)
      const fit = Math.max(0.7 * H, Math.min(H, 0.78 * window.innerHeight));
      const svg = el("svg", {viewBox: `0 0 ${W} ${H}`, width: (W * fit / H).toFixed(0), height: fit.toFixed(0), id: "attr-graph"});
      for (const [key, v] of edges) {
        const [a, b] = key.split("|"), na = nodes[a], nb = nodes[b];
        const dim = through && !(through.has(a) && through.has(b));
        const mid = (na.y + nb.y) / 2;
        const fixed = a === "groups" || a === "remainder";
        const d = fixed ? `M${na.x},${na.y} L${nb.x},${nb.y}` : `M${na.x},${na.y} C${na.x},${mid} ${nb.x},${mid} ${nb.x},${nb.y}`;
        svg.append(el("path", {class: fixed ? "extra" : "edge" + (dim ? " dim" : ""), d,
          stroke: v >= 0 ? "#2666d0" : "#d03a2a", "stroke-width": Math.min(12, 0.6 + 9 * Math.abs(v) / biggest).toFixed(2),
          opacity: 0.75, "stroke-dasharray": fixed ? "5,4" : "none", fill: "none"},
          el("title", {}, `${nodes[a].label} → ${nodes[b].label}: ${fmt(v)}`)));
      }
      const used = new Set(paths.flatMap((p) => p.nodes).concat(view.fixed));
      for (const id of used) {
        const n = nodes[id], dim = through && !through.has(id);
        const g = el("g", {class: "node" + (dim ? " dim" : ""), "data-node": id, on: {click: () => { selected = selected === id ? null : id; draw(); },
          mousemove: (ev) => showTip(ev, `<b>${esc(n.label)}</b>${n.detail ? "<br>" + esc(n.detail) : ""}`), mouseleave: hideTip}});
        g.append(el("rect", {x: n.x - 34, y: n.y - 9, width: 68, height: 18, rx: 4, fill: n.fill || "#fff", stroke: id === selected ? "#000" : "#888", "stroke-width": id === selected ? 2 : 1}));
        g.append(el("text", {x: n.x, y: n.y + 4, "text-anchor": "middle"}, n.short || n.label));
        svg.append(g);
      }
      graph.replaceChildren(svg);
      const listed = selected ? paths.filter((p) => p.nodes.includes(selected)) : paths;
      side.replaceChildren(el("h3", {}, selected ? `paths through ${nodes[selected].label}` : "paths shown"),
        el("table", {class: "rows"}, el("tr", {}, el("th", {}, "path"), el("th", {class: "num"}, "contribution"), el("th", {class: "num"}, "of the value")),
          ...listed.slice(0, 300).map((p) => el("tr", {}, el("td", {}, p.text), el("td", {class: "num"}, fmt(p.contribution, 4)),
            el("td", {class: "num"}, pct(p.contribution / view.value))))));
    }
    info.textContent = `value ${fmt(view.value, 5)}; listed paths ${fmt(view.listed, 4)}, unexpanded groups ${fmt(view.groups, 4)}, remainder ${fmt(view.remainder, 3)}`;
    draw();
  }

  // ------------------------------------------------------------------ tables: sort, search, pages
  function tableView(view, root) {
    let rows = view.rows.map((r, i) => ({r, i})), page = 0, sortBy = null, descending = true, query = "";
    const size = 100;
    const search = el("input", {type: "search", placeholder: "search token text", id: "table-search",
      on: {input: (e) => { query = e.target.value.toLowerCase(); page = 0; draw(); }}});
    const pager = el("span", {id: "table-pager"});
    const prev = el("button", {on: {click: () => { page = Math.max(0, page - 1); draw(); }}}, "‹ previous");
    const next = el("button", {on: {click: () => { page += 1; draw(); }}}, "next ›");
    root.append(el("div", {class: "controls"}, search, prev, pager, next));
    const holder = el("div", {});
    root.append(holder);
    function draw() {
      let shown = query ? rows.filter(({r}) => view.search.some((c) => String(r[c]).toLowerCase().includes(query))) : rows;
      if (sortBy !== null) shown = [...shown].sort((a, b) => {
        const x = a.r[sortBy], y = b.r[sortBy];
        const c = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
        return descending ? -c : c;
      });
      const pages = Math.max(1, Math.ceil(shown.length / size));
      page = Math.min(page, pages - 1);
      pager.textContent = ` page ${page + 1} of ${pages} (${shown.length} rows) `;
      const table = el("table", {class: "rows", id: "table-rows"}, el("tr", {}, ...view.columns.map((c, k) =>
        el("th", {on: {click: () => { descending = sortBy === k ? !descending : true; sortBy = k; draw(); }}},
          c + (sortBy === k ? (descending ? " ▼" : " ▲") : "")))));
      for (const {r} of shown.slice(page * size, (page + 1) * size))
        table.append(el("tr", {}, ...r.map((v) => el("td", {class: typeof v === "number" ? "num" : ""}, typeof v === "number" ? fmt(v, 4) : v))));
      holder.replaceChildren(table);
    }
    draw();
  }

  const VIEWS = {lens: lensView, attribution: attributionView, table: tableView,
    curves: (view, root) => root.append(curvesChart(view.curves))};
  const nav = document.getElementById("nav"), main = document.getElementById("views");
  DATA.views.forEach((view, i) => {
    const section = el("section", {class: "view" + (i === 0 ? " active" : ""), id: "view-" + i, "data-kind": view.kind},
      el("h2", {}, view.title), view.subtitle ? el("p", {class: "muted"}, view.subtitle) : "");
    const button = el("button", {class: i === 0 ? "active" : "", on: {click: () => {
      document.querySelectorAll("section.view, nav button").forEach((x) => x.classList.remove("active"));
      section.classList.add("active"); button.classList.add("active"); }}}, view.title);
    nav.append(button); main.append(section);
    VIEWS[view.kind](view, section);
  });
  document.body.setAttribute("data-ready", "true");
})();
