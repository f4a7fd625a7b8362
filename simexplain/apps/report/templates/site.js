"use strict";
(function () {
  function byId(id) { return document.getElementById(id); }
  const site = JSON.parse(byId("report-data").textContent);
  const size = site.page_size;
  // A reloaded page may keep the controls' values: start from them.
  const state = { sort: byId("sort").value, filter: byId("filter").value, page: 0, hits: null };
  const cache = {};
  const pending = {};
  let shown = null;  // the latest list request: an older one that loads late is dropped
  function fail(message) {
    byId("error").hidden = false;
    byId("error").textContent = message;
  }

  // Browsers block fetch() of file:// URLs but not scripts: each data file is a script
  // that hands its JSON to window.simexplainSite.
  function load(key, src, done) {
    if (key in cache) { done(cache[key]); return; }
    if (pending[key]) { pending[key].push(done); return; }
    pending[key] = [done];
    const script = document.createElement("script");
    script.src = src;
    script.onload = function () { script.remove(); };
    script.onerror = function () {
      script.remove();
      delete pending[key];
      fail("could not load " + src);
    };
    document.head.appendChild(script);
  }
  function deliver(key, data, keep) {
    if (keep) { cache[key] = data; }
    const waiting = pending[key] || [];
    delete pending[key];
    waiting.forEach(function (done) { done(data); });
  }
  window.simexplainSite = {
    names: function (data) { deliver("names", data, true); },
    page: function (name, rows) { deliver("page:" + name, rows, true); },
    query: function (id, record) { deliver("query:" + id, record, false); },
  };
  function loadPage(name, done) { load("page:" + name, "data/pages/" + name + ".js", done); }

  function pageCount() {
    const total = state.hits ? state.hits.length : site.count;
    return Math.max(1, Math.ceil(total / size));
  }

  function showList() {
    const request = {};
    shown = request;
    const pages = pageCount();
    byId("page-info").textContent = "page " + (state.page + 1) + " of " + pages +
      (state.hits ? " (" + state.hits.length + " matching)" : "");
    byId("previous").disabled = state.page === 0;
    byId("next").disabled = state.page + 1 >= pages;
    function render(rows) {
      if (shown !== request) { return; }
      const table = byId("queries");
      table.querySelector("tbody").replaceChildren(...rows.map(rowElement));
      table.dataset.shown = state.sort + ":" + state.page;
    }
    if (state.hits) {
      rowsAt(state.hits.slice(state.page * size, (state.page + 1) * size), render);
    } else if (site.count === 0) {
      render([]);
    } else {
      loadPage(state.sort + "-" + state.page, render);
    }
  }

  // The rows at these positions of the top-desc order (the order of data/names.js).
  function rowsAt(positions, done) {
    const files = Array.from(new Set(positions.map(function (p) { return Math.floor(p / size); })));
    let left = files.length;
    if (left === 0) { done([]); return; }
    files.forEach(function (n) {
      loadPage("top-desc-" + n, function () {
        left -= 1;
        if (left > 0) { return; }
        done(positions.map(function (p) {
          return cache["page:top-desc-" + Math.floor(p / size)][p % size];
        }));
      });
    });
  }

  function applyFilter() {
    const text = state.filter.trim().toLowerCase();
    if (!text) {
      state.hits = null;
      showList();
      return;
    }
    load("names", "data/names.js", function (names) {
      if (state.filter.trim().toLowerCase() !== text) { return; }
      const labels = names.labels.map(function (l) { return l.toLowerCase(); });
      const found = [];
      names.rows.forEach(function (row, position) {
        if (row[0].toLowerCase().includes(text) || (row[1] >= 0 && labels[row[1]].includes(text))) {
          found.push(position);
        }
      });
      state.hits = sorted(found, names.rows);
      showList();
    });
  }
  // The pages' orders, from the top-desc order (as site_index.py derives them).
  function sorted(positions, rows) {
    if (state.sort === "top-asc") { return positions.slice().reverse(); }
    if (state.sort !== "failed") { return positions; }
    return positions.filter(function (p) { return rows[p][3]; })
      .concat(positions.filter(function (p) { return !rows[p][3]; }));
  }

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) { td.className = className; }
    row.appendChild(td);
    return td;
  }
  function mark(correct) {
    const span = document.createElement("span");
    span.className = "mark";
    if (correct !== null) {
      span.classList.add(correct ? "correct" : "incorrect");
      span.textContent = correct ? "\u2713 " : "\u2717 ";
      span.title = correct ? "same label as the query" : "different label from the query";
    }
    return span;
  }
  function named(name, label) { return label === null ? name : name + " (" + label + ")"; }

  function rowElement(row) {
    const tr = document.createElement("tr");
    tr.dataset.id = row.id;
    if (row.failed) { tr.className = "failed"; }
    cell(tr, String(row.id));
    const query = cell(tr, row.name, "name");
    if (row.image) {
      const image = document.createElement("img");
      image.loading = "lazy";
      image.alt = "";
      image.src = row.image;
      query.prepend(image);
    }
    cell(tr, row.label === null ? "" : row.label);
    cell(tr, row.top.toFixed(3), "score");
    cell(tr, named(row.match, row.match_label)).prepend(mark(row.match_correct));
    cell(tr, row.correct ? row.correct[0] + "/" + row.correct[1] : "");
    cell(tr, row.correct_rank ? "correct match at rank " + row.correct_rank :
      (row.failed ? "top match wrong" : ""));
    tr.addEventListener("click", function () { location.hash = "query-" + row.id; });
    return tr;
  }

  function picture(image, src) {
    if (src) { image.src = src; } else { image.remove(); }
  }
  function fromTemplate(id) {
    return byId(id).content.firstElementChild.cloneNode(true);
  }
  function matchElement(match, k) {
    const figure = fromTemplate("match-template");
    if (match.correct !== null) { figure.classList.add(match.correct ? "correct" : "incorrect"); }
    figure.querySelector(".rank").textContent = "#" + (k + 1);
    figure.querySelector(".mark").replaceWith(mark(match.correct));
    figure.querySelector(".name").textContent = match.name;
    figure.querySelector(".label").textContent = match.label === null ? "" : match.label;
    figure.querySelector(".score").textContent = "cos " + match.similarity.toFixed(3);
    picture(figure.querySelector(".photo"), match.image);
    picture(figure.querySelector(".match-map"), match.match_map);
    picture(figure.querySelector(".query-map"), match.query_map);
    return figure;
  }
  function memberElement(caption, photo, map) {
    const figure = fromTemplate("member-template");
    figure.querySelector("figcaption").textContent = caption;
    picture(figure.querySelector(".photo"), photo);
    picture(figure.querySelector(".map"), map);
    return figure;
  }

  function showFailure(box, record) {
    const f = record.failure;
    const wrong = record.matches[0];
    const correct = named(f.correct_name, f.correct_label);
    box.querySelector(".failure-info").textContent = "The top match, " +
      named(wrong.name, wrong.label) + ", cos " + f.similarities[1].toFixed(3) +
      ", outranked the best match of the query's label, " + correct + ", at rank " +
      f.correct_rank + " with cos " + f.similarities[0].toFixed(3) + ". Each image with its map:";
    box.querySelector(".triplet").replaceChildren(
      memberElement("query: " + named(record.name, record.label), record.image, f.maps[0]),
      memberElement("correct, rank " + f.correct_rank + ": " + correct, f.correct_image, f.maps[1]),
      memberElement("wrong, rank 1: " + named(wrong.name, wrong.label), wrong.image, f.maps[2])
    );
  }

  function showQuery(id, record) {
    const view = byId("query");
    byId("query-title").textContent = "query " + id + ": " + named(record.name, record.label);
    const photo = view.querySelector(".query-photo");
    photo.querySelector("figcaption").textContent =
      record.image ? "query" : "query given as an embedding: no image";
    photo.querySelector("img").hidden = !record.image;
    if (record.image) { photo.querySelector("img").src = record.image; }
    view.querySelector(".results").replaceChildren(...record.matches.map(matchElement));
    const failure = view.querySelector(".failure");
    failure.hidden = !record.failure;
    if (record.failure) { showFailure(failure, record); }
    view.dataset.id = id;
  }

  function route() {
    const found = /^#query-(\d+)$/.exec(location.hash);
    byId("list").hidden = Boolean(found);
    byId("query").hidden = !found;
    if (!found) { return; }
    const id = Number(found[1]);
    load("query:" + id, "data/queries/" + id + ".js", function (record) {
      if (location.hash === "#query-" + id) { showQuery(id, record); }
    });
  }

  byId("counts").textContent = site.count + " queries, " + site.failures +
    " with a top match of another label; " + size + " a page.";
  byId("sort").addEventListener("change", function (event) {
    state.sort = event.target.value;
    state.page = 0;
    applyFilter();
  });
  byId("filter").addEventListener("input", function (event) {
    state.filter = event.target.value;
    state.page = 0;
    applyFilter();
  });
  byId("previous").addEventListener("click", function () {
    state.page = Math.max(0, state.page - 1);
    showList();
  });
  byId("next").addEventListener("click", function () {
    state.page = Math.min(pageCount() - 1, state.page + 1);
    showList();
  });
  window.addEventListener("hashchange", route);
  applyFilter();
  route();
})();
