// agentvm report: filter by status, search by name. No network, no eval.
(function () {
  "use strict";
  var rows = Array.prototype.slice.call(document.querySelectorAll("#index tr[data-status]"));
  var search = document.getElementById("search");
  var buttons = Array.prototype.slice.call(document.querySelectorAll("#filters button[data-filter]"));
  var shown = document.getElementById("shown");
  var filter = "all";
  function apply() {
    var q = search.value.trim().toLowerCase();
    var n = 0;
    rows.forEach(function (row) {
      var status = row.getAttribute("data-status");
      var okStatus = filter === "all" ||
        (filter === "anomalies" ? row.getAttribute("data-anomalies") !== "0" : status === filter);
      var okName = q === "" || row.getAttribute("data-name").indexOf(q) !== -1;
      row.hidden = !(okStatus && okName);
      if (!row.hidden) { n += 1; }
    });
    shown.textContent = String(n);
  }
  buttons.forEach(function (button) {
    button.addEventListener("click", function () {
      filter = button.getAttribute("data-filter");
      buttons.forEach(function (b) { b.setAttribute("aria-pressed", String(b === button)); });
      apply();
    });
  });
  search.addEventListener("input", apply);
  apply();
  document.body.setAttribute("data-ready", "1");
})();
