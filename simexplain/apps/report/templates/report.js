"use strict";
(function () {
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const colormap = data.colormap;
  function paint(canvas, entry, cell) {
    const [h2, w2] = entry.match_grid;
    canvas.width = w2;
    canvas.height = h2;
    const context = canvas.getContext("2d");
    const pixels = context.createImageData(w2, h2);
    const start = cell * h2 * w2;
    for (let i = 0; i < h2 * w2; i++) {
      const value = entry.values[start + i] / 1000;
      const colour = colormap[Math.min(255, Math.round(value * 255))];
      pixels.data.set([colour[0], colour[1], colour[2], Math.round(255 * 0.8 * value)], 4 * i);
    }
    context.putImageData(pixels, 0, 0);
  }
  document.querySelectorAll(".card").forEach(function (card) {
    const cardData = data.cards[Number(card.dataset.index)];
    const entries = cardData.matches;
    const first = entries.find(function (e) { return e !== null; });
    const query = card.querySelector(".query .stack");
    const info = card.querySelector(".point-info");
    if (!first) {
      info.textContent = data.point_maps_note;
      return;
    }
    query.addEventListener("click", function (event) {
      const box = query.getBoundingClientRect();
      const x = (event.clientX - box.left) / box.width;
      const y = (event.clientY - box.top) / box.height;
      const [h, w] = first.grid;
      const row = Math.min(h - 1, Math.max(0, Math.floor(y * h)));
      const col = Math.min(w - 1, Math.max(0, Math.floor(x * w)));
      const cell = row * w + col;
      const marker = card.querySelector(".marker");
      marker.hidden = false;
      marker.style.left = (100 * x) + "%";
      marker.style.top = (100 * y) + "%";
      card.dataset.point = row + "," + col;
      card.querySelectorAll(".result").forEach(function (result, k) {
        if (entries[k]) { paint(result.querySelector("canvas.point-map"), entries[k], cell); }
      });
      const share = first.shares[cell];
      info.textContent = "cell (" + row + ", " + col + ") of " + h + "x" + w +
        ": its share of the top match's cosine is " + share.toFixed(3);
    });
  });
})();
