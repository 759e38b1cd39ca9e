"""The head-view page's markup, style and script (inline: the page needs no network).

The script reads the JSON data block written by :mod:`qkv.inspect.headview` and draws an SVG:
query tokens in the left column, key tokens in the right one, and for the selected heads one line
per (query, key) pair whose opacity is the attention weight. A head's weights are decoded from
base64 the first time that head is drawn, so a page of many heads opens at once. Long inputs
(more than ``all_lines_limit`` query rows) draw one token's lines at a time. State (layer, heads,
selected token) also comes from the URL fragment, e.g. ``#token=3&layer=0&head=0,5&side=query``.
"""

PAGE_STYLE = """
body { font-family: "DejaVu Sans", "Helvetica Neue", Arial, sans-serif; margin: 18px 24px; color: #222;
       background: #fff; }
h1 { font-size: 19px; font-weight: 600; margin: 0 0 10px 0; }
#controls { display: flex; flex-wrap: wrap; align-items: center; gap: 8px 14px; font-size: 14px; }
#controls select { font-size: 14px; padding: 2px 4px; }
#heads { display: inline-flex; flex-wrap: wrap; gap: 4px; }
.swatch { min-width: 22px; height: 22px; border-radius: 4px; border: 2px solid transparent; color: #fff;
          font-size: 12px; font-weight: 600; display: inline-flex; align-items: center; justify-content: center;
          cursor: pointer; user-select: none; padding: 0 2px; }
.swatch.off { opacity: 0.22; }
button { font-size: 13px; }
.help { font-size: 13px; color: #555; margin: 8px 0 4px 0; max-width: 900px; }
#view text { font-size: 15px; dominant-baseline: central; cursor: pointer; }
#view text.header { font-size: 12px; fill: #777; cursor: default; }
#view rect.token-bg { fill: transparent; }
#view rect.token-bg.selected { fill: #ffe9a8; }
#main { display: flex; flex-wrap: wrap; align-items: flex-start; gap: 12px 36px; }
#view.compact text { font-size: 12px; }
#details { font-size: 13px; margin-top: 24px; }
#columns.compact { max-height: calc(100vh - 190px); min-height: 300px; overflow-y: auto; border-top: 1px solid #eee;
                   border-bottom: 1px solid #eee; }
#details table { border-collapse: collapse; }
#details td { padding: 2px 8px 2px 0; white-space: nowrap; }
"""

PAGE_BODY = """
<h1 id="title"></h1>
<div id="controls">
  <label id="layer-control">Layer <select id="layer"></select></label>
  <span id="head-control">Heads <span id="heads"></span>
    <button id="all-heads" type="button">all</button> <button id="no-heads" type="button">none</button></span>
</div>
<p class="help">Hover over a token to see its attention, click to pin it (click again to release).
Left column: the token that attends (query); right column: the tokens it attends to (keys).
Line opacity = attention weight, one colour per head. Click a head's swatch to show or hide it,
double-click to show only that head. <span id="note"></span></p>
<div id="main">
<div id="columns"><svg id="view" width="10" height="10"></svg></div>
<div id="details"></div>
</div>
"""

PAGE_SCRIPT = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("qkv-head-view-data").textContent);
  // Saturated colours that stay visible on white at low opacity (no greys, no pale yellows).
  var PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#0e8f9c",
                 "#8a8a00", "#393b79", "#ad494a", "#637939", "#7b4173", "#e6550d", "#3182bd", "#31a354"];
  var nLayers = data.shape[0], nHeads = data.shape[1], nq = data.shape[2], nk = data.shape[3];
  var compact = Math.max(nq, nk) > 64;
  var ROW = compact ? 16 : 26, TOP = 34, GAP = compact ? 360 : 280, PAD = 14, LINE_END = 8;
  var allLines = nq <= (data.all_lines_limit || 64);
  var layerLabels = data.layers || [0];
  var headLabels = data.heads || [0];
  var svg = document.getElementById("view");
  var SVG_NS = svg.namespaceURI;
  var state = { layer: 0, heads: [], token: null, side: "query", pinned: false };
  for (var h = 0; h < nHeads; h++) state.heads.push(true);

  function el(name, attrs, parent) {
    var node = document.createElementNS(SVG_NS, name);
    for (var key in attrs) node.setAttribute(key, attrs[key]);
    if (parent) parent.appendChild(node);
    return node;
  }
  function colour(h) { return PALETTE[h % PALETTE.length]; }

  // ---- weights: one base64 string per (layer, head), decoded when first needed -------------
  var decoded = {};
  function bytesOf(text) {
    var raw = atob(text), bytes = new Uint8Array(raw.length);
    for (var n = 0; n < raw.length; n++) bytes[n] = raw.charCodeAt(n);
    return bytes;
  }
  function headMap(h) {
    var key = state.layer + ":" + h;
    if (decoded[key]) return decoded[key];
    var entry = data.maps[state.layer][h], bytes = bytesOf(entry.values), values;
    if (data.encoding === "uint8") {
      values = new Float32Array(bytes.length);
      for (var n = 0; n < bytes.length; n++) values[n] = bytes[n] / 255;
    } else if (data.encoding === "float64") {
      values = new Float64Array(bytes.buffer);
    } else {
      values = new Float32Array(bytes.buffer);
    }
    var indices = entry.indices ? new Uint16Array(bytesOf(entry.indices).buffer) : null;
    decoded[key] = { values: values, indices: indices, cols: values.length / nq };
    return decoded[key];
  }
  // Calls fn(key, weight) for the stored weights of query row i (all keys, or the row's top k).
  function eachInRow(h, i, fn) {
    var m = headMap(h), base = i * m.cols;
    for (var c = 0; c < m.cols; c++) fn(m.indices ? m.indices[base + c] : c, m.values[base + c]);
  }
  function weight(h, i, j) {
    var m = headMap(h), base = i * m.cols;
    if (!m.indices) return m.values[base + j];
    for (var c = 0; c < m.cols; c++) if (m.indices[base + c] === j) return m.values[base + c];
    return 0;
  }

  // ---- controls --------------------------------------------------------------------------
  document.getElementById("title").textContent = data.title;
  var notes = [];
  if (data.top_k !== null) notes.push("Each token keeps its " + data.top_k + " largest weights per head (of " + nk + ").");
  if (data.encoding === "uint8") notes.push("Weights are rounded to multiples of 1/255.");
  if (!allLines) notes.push(nq + " tokens: lines are drawn for one token at a time.");
  document.getElementById("note").textContent = notes.join(" ");
  var columnsBox = document.getElementById("columns");
  if (compact) { svg.setAttribute("class", "compact"); columnsBox.className = "compact"; }
  var layerSelect = document.getElementById("layer");
  layerLabels.forEach(function (label, index) {
    var option = document.createElement("option");
    option.value = index; option.textContent = String(label);
    layerSelect.appendChild(option);
  });
  if (!data.layers) document.getElementById("layer-control").style.display = "none";
  layerSelect.addEventListener("change", function () { state.layer = Number(layerSelect.value); draw(); });
  var swatches = [];
  var headBox = document.getElementById("heads");
  headLabels.forEach(function (label, h) {
    var s = document.createElement("span");
    s.className = "swatch"; s.style.background = colour(h); s.textContent = String(label);
    s.title = "head " + label;
    s.addEventListener("click", function () { state.heads[h] = !state.heads[h]; draw(); });
    s.addEventListener("dblclick", function () {
      for (var g = 0; g < nHeads; g++) state.heads[g] = g === h;
      draw();
    });
    headBox.appendChild(s); swatches.push(s);
  });
  if (!data.heads) document.getElementById("head-control").style.display = "none";
  function setAllHeads(on) { for (var g = 0; g < nHeads; g++) state.heads[g] = on; draw(); }
  document.getElementById("all-heads").addEventListener("click", function () { setAllHeads(true); });
  document.getElementById("no-heads").addEventListener("click", function () { setAllHeads(false); });

  // ---- token columns ---------------------------------------------------------------------
  var lineLayer = el("g", {}, svg);
  var tokenLayer = el("g", {}, svg);
  function column(tokens, side, header) {
    var title = el("text", { "class": "header" }, tokenLayer);
    title.textContent = header;
    var items = tokens.map(function (token, index) {
      var bg = el("rect", { "class": "token-bg", rx: 3, height: ROW - 4 }, tokenLayer);
      var text = el("text", {}, tokenLayer);
      text.textContent = token;
      [bg, text].forEach(function (node) {
        node.addEventListener("mouseenter", function () { if (!state.pinned) select(side, index); });
        node.addEventListener("mouseleave", function () { if (!state.pinned) select(null, null); });
        node.addEventListener("click", function () {
          var same = state.pinned && state.side === side && state.token === index;
          state.pinned = !same;
          if (same) select(null, null); else select(side, index);
        });
      });
      return { bg: bg, text: text };
    });
    var width = title.getComputedTextLength();
    items.forEach(function (item) { width = Math.max(width, item.text.getComputedTextLength()); });
    return { title: title, items: items, width: Math.ceil(width) + 8 };
  }
  var left = column(data.tokens, "query", "query (attends)");
  var right = column(data.key_tokens, "key", "key (attended to)");
  var xLeft = PAD + left.width, xRight = xLeft + GAP;
  function y(index) { return TOP + index * ROW + ROW / 2; }
  left.items.forEach(function (item, i) {
    item.text.setAttribute("x", xLeft - 4); item.text.setAttribute("y", y(i));
    item.text.setAttribute("text-anchor", "end");
    item.bg.setAttribute("x", xLeft - left.width); item.bg.setAttribute("y", y(i) - ROW / 2 + 2);
    item.bg.setAttribute("width", left.width);
  });
  right.items.forEach(function (item, j) {
    item.text.setAttribute("x", xRight + 4); item.text.setAttribute("y", y(j));
    item.bg.setAttribute("x", xRight); item.bg.setAttribute("y", y(j) - ROW / 2 + 2);
    item.bg.setAttribute("width", right.width);
  });
  [[left.title, xLeft - 4, "end"], [right.title, xRight + 4, "start"]].forEach(function (spec) {
    spec[0].setAttribute("x", spec[1]); spec[0].setAttribute("y", TOP - 14);
    spec[0].setAttribute("text-anchor", spec[2]);
  });
  svg.setAttribute("width", xRight + right.width + PAD);
  svg.setAttribute("height", TOP + Math.max(nq, nk) * ROW + PAD);

  // ---- drawing ---------------------------------------------------------------------------
  function select(side, index) { state.side = side || "query"; state.token = index; draw(); }

  function draw() {
    swatches.forEach(function (s, h) { s.className = state.heads[h] ? "swatch" : "swatch off"; });
    layerSelect.value = state.layer;
    while (lineLayer.firstChild) lineLayer.removeChild(lineLayer.firstChild);
    var chosen = state.token !== null;
    [[left, "query"], [right, "key"]].forEach(function (spec) {
      spec[0].items.forEach(function (item, n) {
        var selected = chosen && state.side === spec[1] && state.token === n;
        item.bg.setAttribute("class", selected ? "token-bg selected" : "token-bg");
      });
    });
    var shown = [];
    for (var g = 0; g < nHeads; g++) if (state.heads[g]) shown.push(g);
    var spread = Math.min(2.5, (ROW - 8) / Math.max(1, shown.length - 1));
    shown.forEach(function (h, rank) {
      // Each head's lines end a little apart (a fan), so that overlapping heads stay visible.
      var fan = (rank - (shown.length - 1) / 2) * spread;
      var fanQuery = chosen && state.side === "key" ? fan : 0, fanKey = fan - fanQuery;
      function line(i, j, w) {
        if (w <= 0.002) return;
        el("line", { x1: xLeft + LINE_END, y1: y(i) + fanQuery, x2: xRight - LINE_END, y2: y(j) + fanKey,
                     stroke: colour(h),
                     "stroke-width": chosen ? 3 : 2, "stroke-opacity": Math.min(1, w),
                     "stroke-linecap": "round", "data-head": h, "data-query": i, "data-key": j }, lineLayer);
      }
      if (!chosen && !allLines) return;
      for (var i = 0; i < nq; i++) {
        if (chosen && state.side === "query" && i !== state.token) continue;
        if (chosen && state.side === "key") { line(i, state.token, weight(h, i, state.token)); continue; }
        eachInRow(h, i, function (j, w) { line(i, j, w); });
      }
    });
    details();
  }

  function details() {
    var box = document.getElementById("details");
    while (box.firstChild) box.removeChild(box.firstChild);
    if (state.token === null) {
      box.textContent = allLines ? "No token selected: all lines of the shown heads are drawn."
                                 : "No token selected: hover over a token, or click it to pin it.";
      return;
    }
    var fromQuery = state.side === "query";
    var name = (fromQuery ? data.tokens : data.key_tokens)[state.token];
    var heading = document.createElement("div");
    heading.textContent = (fromQuery ? "\u201c" + name + "\u201d (query " + state.token + ") attends most to:"
                                     : "\u201c" + name + "\u201d (key " + state.token + ") is attended most by:");
    box.appendChild(heading);
    var table = document.createElement("table");
    for (var h = 0; h < nHeads; h++) {
      if (!state.heads[h]) continue;
      var ranked = [];
      if (fromQuery) {
        eachInRow(h, state.token, function (j, w) { ranked.push([j, w]); });
      } else {
        for (var n = 0; n < nq; n++) ranked.push([n, weight(h, n, state.token)]);
      }
      ranked.sort(function (a, b) { return b[1] - a[1]; });
      var row = document.createElement("tr");
      var label = document.createElement("td");
      var chip = document.createElement("span");
      chip.className = "swatch"; chip.style.background = colour(h); chip.textContent = String(headLabels[h]);
      label.appendChild(chip);
      row.appendChild(label);
      ranked.slice(0, 3).forEach(function (pair) {
        var cell = document.createElement("td");
        cell.textContent = (fromQuery ? data.key_tokens : data.tokens)[pair[0]] + " " + pair[1].toFixed(2);
        row.appendChild(cell);
      });
      table.appendChild(row);
    }
    box.appendChild(table);
  }

  // ---- URL fragment: #token=3&layer=0&head=0,5&side=query ----------------------------------
  function fromFragment() {
    var params = {};
    window.location.hash.replace(/^#/, "").split("&").forEach(function (part) {
      var kv = part.split("=");
      if (kv.length === 2) params[decodeURIComponent(kv[0])] = decodeURIComponent(kv[1]);
    });
    if ("layer" in params) {
      var li = layerLabels.map(String).indexOf(params.layer);
      if (li >= 0) state.layer = li;
    }
    if ("head" in params) {
      if (params.head === "all") { for (var g = 0; g < nHeads; g++) state.heads[g] = true; }
      else {
        var wanted = params.head.split(",");
        for (var g2 = 0; g2 < nHeads; g2++) state.heads[g2] = wanted.indexOf(String(headLabels[g2])) >= 0;
      }
    }
    if ("side" in params && (params.side === "query" || params.side === "key")) state.side = params.side;
    if ("token" in params) {
      var t = parseInt(params.token, 10);
      var limit = state.side === "query" ? nq : nk;
      if (t >= 0 && t < limit) { state.token = t; state.pinned = true; }
    }
    draw();
    if (state.token !== null && compact) {  // bring the chosen token to the middle of the token columns
      columnsBox.scrollTop = Math.max(0, y(state.token) - columnsBox.clientHeight / 2);
    }
  }
  window.addEventListener("hashchange", fromFragment);
  fromFragment();
})();
"""
