// The review page: sort, filter and page the table of data.js; detail view from details/chunk-N.js.
// Sort keys are those of pointseg/review/table.py (sort_key): keep the two in step.
(function () {
  "use strict";
  var R = window.REVIEW, rows = R.rows, meta = R.meta, cats = R.categories;
  var state = { sort: meta.sort, cls: "", err: "", page: 0, order: [] };
  var chunks = {}, waiting = {};
  var $ = function (id) { return document.getElementById(id); };

  function missingLast(v, desc) { return v === null || v === undefined ? [1, 0] : [0, desc ? -v : v]; }
  function sortKey(r, by) {
    if (by === "image_id") { return [r.id]; }
    var failed = r.err ? 0 : 1;
    if (by === "pq") { return [failed].concat(missingLast(r.pq, false), missingLast(r.u, true), [r.id]); }
    if (by === "uncertainty") { return [failed].concat(missingLast(r.u, true), [r.id]); }
    return [failed].concat(missingLast(r.iou, false), [r.id]);  // best_iou
  }
  function compare(a, b) {
    for (var i = 0; i < a.length; i++) {
      if (a[i] < b[i]) { return -1; }
      if (a[i] > b[i]) { return 1; }
    }
    return 0;
  }
  function keep(r) {
    if (state.cls !== "" && r.cl.indexOf(Number(state.cls)) < 0) { return false; }
    switch (state.err) {
      case "failed": return !!r.err;
      case "labelled": return !r.err;
      case "warnings": return r.wn > 0;
      case "missed": return r.fn > 0;
      case "spurious": return r.fp > 0;
      default: return true;
    }
  }
  function recompute() {
    var keyed = rows.filter(keep).map(function (r) { return [sortKey(r, state.sort), r]; });
    keyed.sort(function (a, b) { return compare(a[0], b[0]); });
    state.order = keyed.map(function (k) { return k[1]; });
  }

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) { e.textContent = text; }
    return e;
  }
  function fmt(v, scale, digits) { return v === null || v === undefined ? "n/a" : (scale * v).toFixed(digits); }
  function pct(v) { return v === null || v === undefined ? "n/a" : (100 * v).toFixed(1) + "%"; }
  function catName(id) { var c = cats[String(id)]; return c ? c[0] : String(id); }

  function card(r) {
    var a = el("a", { "class": "card" + (r.err ? " failed" : ""), href: "#image=" + r.id, "data-id": String(r.id) });
    var box = el("div", { "class": "thumb" });
    if (r.t) {
      var f = Math.min(1, meta.thumb_size / Math.max(r.h, r.w));
      box.appendChild(el("img", { loading: "lazy", decoding: "async", alt: "", src: "a/thumb/" + r.id + ".jpg",
        width: String(Math.max(1, Math.round(r.w * f))), height: String(Math.max(1, Math.round(r.h * f))) }));
    } else {
      box.appendChild(el("div", { "class": "noimg" }, "no picture"));
    }
    a.appendChild(box);
    a.appendChild(el("div", { "class": "name", title: r.f }, "#" + r.id + " " + r.f));
    var s = el("div", { "class": "scores" });
    if (meta.has_uncertainty) { s.appendChild(el("span", { title: "mean uncertainty" }, "u " + fmt(r.u, 1, 3))); }
    if (meta.has_gt) {
      s.appendChild(el("span", { title: "panoptic quality of this image" }, "PQ " + fmt(r.pq, 100, 1)));
      s.appendChild(el("span", { title: "mean best IoU per ground-truth thing" }, "IoU " + fmt(r.iou, 1, 2)));
    }
    a.appendChild(s);
    if (r.err) { a.appendChild(el("div", { "class": "reason", title: r.err }, "failed: " + r.err)); }
    return a;
  }

  function renderGrid() {
    var size = meta.page_size, pages = Math.max(1, Math.ceil(state.order.length / size));
    state.page = Math.min(Math.max(0, state.page), pages - 1);
    var grid = $("grid"), frag = document.createDocumentFragment();
    state.order.slice(state.page * size, (state.page + 1) * size).forEach(function (r) { frag.appendChild(card(r)); });
    grid.replaceChildren(frag);
    $("page").textContent = "page " + (state.page + 1) + " / " + pages;
    $("prev").disabled = state.page === 0;
    $("next").disabled = state.page >= pages - 1;
    $("shown").textContent = state.order.length + " of " + rows.length + " images";
  }

  function loadChunk(n, done) {
    if (chunks[n]) { done(chunks[n]); return; }
    if (waiting[n]) { waiting[n].push(done); return; }
    waiting[n] = [done];
    var s = el("script", { src: "details/chunk-" + String(n).padStart(5, "0") + ".js" });
    s.onerror = function () { var w = waiting[n]; delete waiting[n]; w.forEach(function (f) { f(null); }); };
    document.body.appendChild(s);
  }
  window.reviewDetails = function (n, data) {
    chunks[n] = data;
    var w = waiting[n] || [];
    delete waiting[n];
    w.forEach(function (f) { f(data); });
  };

  function setPanel(name, src, missing) {
    var fig = document.querySelector('.panel[data-panel="' + name + '"]');
    var img = fig.querySelector("img");
    if (src) { img.hidden = false; img.src = src; } else { img.hidden = true; img.removeAttribute("src"); }
    fig.querySelector(".missing").textContent = src ? "" : missing;
  }
  function marks(r, d) {
    var svg = document.querySelector(".marks"), ns = "http://www.w3.org/2000/svg";
    svg.setAttribute("viewBox", "0 0 " + r.w + " " + r.h);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.replaceChildren();
    var rad = Math.max(r.w, r.h) / 70;
    function circle(x, y, rr, fill, stroke, width) {
      var c = document.createElementNS(ns, "circle");
      [["cx", x + 0.5], ["cy", y + 0.5], ["r", rr], ["fill", fill], ["stroke", stroke], ["stroke-width", width]]
        .forEach(function (kv) { c.setAttribute(kv[0], kv[1]); });
      svg.appendChild(c);
    }
    d.points.forEach(function (p) { circle(p[0], p[1], rad, "#ffeb3b", "#000", rad / 3); });
    d.suggestions.forEach(function (p, i) {
      circle(p[0], p[1], rad * 1.6, "none", "#ff1744", rad / 1.8);
      var t = document.createElementNS(ns, "text");
      t.setAttribute("x", p[0] + 0.5 + rad * 2); t.setAttribute("y", p[1] + 0.5 - rad * 1.2);
      t.setAttribute("font-size", rad * 3); t.setAttribute("fill", "#ff1744");
      t.setAttribute("stroke", "#fff"); t.setAttribute("stroke-width", rad / 4); t.setAttribute("paint-order", "stroke");
      t.textContent = String(i + 1);
      svg.appendChild(t);
    });
  }
  function table(head, body) {
    var t = el("table"), tr = el("tr");
    head.forEach(function (h) { tr.appendChild(el("th", {}, h)); });
    t.appendChild(tr);
    body.forEach(function (row) {
      var r = el("tr");
      row.forEach(function (c) { r.appendChild(el("td", {}, c)); });
      t.appendChild(r);
    });
    return t;
  }
  function info(r, d) {
    var box = $("dinfo");
    box.replaceChildren();
    var line = "size " + r.w + "x" + r.h + " · " + r.ns + " segments · " + d.points.length + " clicks";
    if (meta.has_uncertainty) { line += " · uncertainty " + fmt(r.u, 1, 3) + " · uncertain " + pct(r.uf); }
    if (meta.has_gt) { line += " · PQ " + fmt(r.pq, 100, 1) + " · best IoU " + fmt(r.iou, 1, 3) + " · FP " + r.fp + " · FN " + r.fn; }
    box.appendChild(el("p", {}, line));
    if (r.err) { box.appendChild(el("p", { "class": "error" }, "failed at " + (r.st || "?") + ": " + r.err)); }
    ["image_error", "review_error"].forEach(function (k) {
      if (d[k]) { box.appendChild(el("p", { "class": "error" }, k.replace("_", " ") + ": " + d[k])); }
    });
    if (d.warnings.length) {
      box.appendChild(el("h3", {}, "Dropped points"));
      box.appendChild(table(["warning"], d.warnings.map(function (w) { return [w]; })));
    }
    if (d.suggestions.length) {
      box.appendChild(el("h3", {}, "Suggested next clicks (red; in suggestions.jsonl)"));
      box.appendChild(table(["#", "x", "y", "would most likely join", "score", "uncertainty"],
        d.suggestions.map(function (p, i) {
          return [String(i + 1), String(p[0]), String(p[1]), "segment " + p[4] + " (" + catName(p[3]) + ")",
            p[5].toFixed(3), p[6].toFixed(3)];
        })));
    }
    if (d.segments.length) {
      box.appendChild(el("h3", {}, "Segments of the pseudo label"));
      var withU = d.segments.some(function (s) { return s[3] !== null; });
      box.appendChild(table(["id", "class", "area"].concat(withU ? ["mean uncertainty", "uncertain"] : []),
        d.segments.map(function (s) {
          var row = [String(s[0]), catName(s[1]), String(s[2])];
          return withU ? row.concat([fmt(s[3], 1, 3), pct(s[4])]) : row;
        })));
    }
  }

  function showDetail(id) {
    var r = rows.filter(function (x) { return x.id === id; })[0];
    if (!r) { location.hash = ""; return; }
    $("controls").hidden = true; $("grid").hidden = true; $("detail").hidden = false;
    $("dtitle").textContent = "#" + r.id + " " + r.f + (r.err ? " (failed)" : "");
    loadChunk(r.c, function (chunk) {
      var d = chunk && chunk[String(r.id)];
      if (!d) { $("dinfo").replaceChildren(el("p", { "class": "error" }, "details not found (details/ missing?)")); return; }
      var p = d.panels;
      setPanel("image", p.image, "image unreadable" + (d.image_error ? ": " + d.image_error : ""));
      setPanel("label", p.label, r.err ? "no pseudo label: " + r.err : "no pseudo label picture");
      setPanel("uncertainty", p.uncertainty, r.err ? "no pseudo label" : "the generator gives no uncertainty map");
      setPanel("gt", p.gt, meta.has_gt ? "no ground truth for this image" : "no ground truth in this run");
      marks(r, d);
      info(r, d);
      document.body.setAttribute("data-detail", String(r.id));
    });
  }
  function showGrid() {
    $("detail").hidden = true; $("controls").hidden = false; $("grid").hidden = false;
    document.body.removeAttribute("data-detail");
  }
  function step(delta) {
    var m = /^#image=(-?\d+)$/.exec(location.hash);
    if (!m) { return; }
    var i = state.order.findIndex(function (r) { return r.id === Number(m[1]); });
    var next = state.order[i + delta];
    if (i >= 0 && next) { location.hash = "#image=" + next.id; }
  }
  function route() {
    var m = /^#image=(-?\d+)$/.exec(location.hash);
    if (m) { showDetail(Number(m[1])); } else { showGrid(); }
  }

  function onControl() {
    state.sort = $("sort").value; state.cls = $("cls").value; state.err = $("err").value; state.page = 0;
    recompute(); renderGrid();
  }
  ["sort", "cls", "err"].forEach(function (id) { $(id).addEventListener("change", onControl); });
  $("prev").addEventListener("click", function () { state.page -= 1; renderGrid(); window.scrollTo(0, 0); });
  $("next").addEventListener("click", function () { state.page += 1; renderGrid(); window.scrollTo(0, 0); });
  $("back").addEventListener("click", function () { location.hash = ""; });
  $("dprev").addEventListener("click", function () { step(-1); });
  $("dnext").addEventListener("click", function () { step(1); });
  document.addEventListener("keydown", function (e) {
    if ($("detail").hidden) { return; }
    if (e.key === "ArrowLeft") { step(-1); } else if (e.key === "ArrowRight") { step(1); }
    else if (e.key === "Escape") { location.hash = ""; }
  });
  window.addEventListener("hashchange", route);

  recompute();
  renderGrid();
  route();
  document.body.setAttribute("data-ready", "1");
}());
