"use strict";
// The agreement page: one GET of /api/agreement, shown as two tables.
function share(value) { return value === null ? "—" : (100 * value).toFixed(1) + " %"; }
function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) { const td = document.createElement("td"); td.textContent = String(cell); tr.append(td); }
  return tr;
}
fetch("/api/agreement").then(r => r.json()).then(data => {
  const labellers = document.querySelector("#labellers tbody");
  for (const l of data.labellers) labellers.append(row([l.name, l.ranked]));
  const pairs = document.querySelector("#pairs tbody");
  for (const p of data.pairs) pairs.append(row([p.a, p.b, p.items, p.pairs, share(p.agreement), share(p.strict)]));
  if (!data.pairs.length) pairs.append(row(["fewer than two labellers so far", "", "", "", "", ""]));
  document.getElementById("overall").textContent = "Overall agreement (all pairs of labellers): " + share(data.overall);
});
