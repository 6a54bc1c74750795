"""The controller's dashboard: one self-contained HTML page (no external assets) served at `/`.

It polls /health, /instances and /history every two seconds and draws the instances, their health,
chunks per tier, tier usage (bytes / capacity, from heartbeats) and hit rate over time (hit tokens /
looked-up tokens between consecutive heartbeats) as an inline SVG. With a controller token, open
`/#token=<token>`: the page sends it as a bearer token (the page itself holds no data).
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kvtier cluster</title>
<style>
 body{font:14px system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
 h1{font-size:20px;margin:0 0 4px} .sub{color:#666;margin-bottom:16px}
 table{border-collapse:collapse;background:#fff;min-width:900px}
 th,td{padding:6px 10px;border-bottom:1px solid #e4e4e4;text-align:left;white-space:nowrap}
 th{background:#f0f0f0}
 .dot{display:inline-block;width:10px;height:10px;border-radius:50%;margin-right:6px}
 .alive .dot{background:#2a2} .dead .dot{background:#c22} .dead{color:#c22}
 .bar{width:140px;height:10px;background:#e8e8e8;border-radius:5px;overflow:hidden;display:inline-block}
 .bar span{display:block;height:100%;background:#48c} .num{font-variant-numeric:tabular-nums}
 #chart{background:#fff;border:1px solid #e4e4e4;margin-top:16px} .err{color:#c22}
</style></head><body>
<h1>kvtier cluster</h1><div class="sub" id="summary">loading…</div>
<table><thead><tr><th>instance</th><th>state</th><th>model</th><th>L1 chunks</th><th>L2 chunks</th>
<th>L1 usage</th><th>L2 usage</th><th>hit rate</th><th>last heard</th></tr></thead>
<tbody id="rows"></tbody></table>
<h2 style="font-size:16px;margin-top:20px">Hit rate over time</h2>
<svg id="chart" width="900" height="260" role="img" aria-label="hit rate over time"></svg>
<div id="legend"></div>
<script>
const COLORS = ["#48c", "#e63", "#2a2", "#a4c", "#c93", "#3aa", "#888"];
const token = (location.hash.match(/token=([^&]+)/) || [])[1];
const get = (path) => fetch(path, {headers: token ? {Authorization: "Bearer " + token} : {}})
  .then((r) => { if (!r.ok) throw new Error(path + ": HTTP " + r.status); return r.json(); });
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";");  // names come from instances
const pct = (x) => x == null ? "–" : (100 * x).toFixed(1) + "%";
const size = (b) => b >= 1 << 30 ? (b / (1 << 30)).toFixed(1) + " GiB"
  : b >= 1 << 20 ? (b / (1 << 20)).toFixed(1) + " MiB" : (b / 1024).toFixed(1) + " KiB";
function usage(s, tier) {
  if (!s || !s[tier + "_capacity"]) return "–";
  const f = s[tier + "_bytes"] / s[tier + "_capacity"];
  return `<span class="bar"><span style="width:${(100 * f).toFixed(1)}%"></span></span> ` +
         `<span class="num">${size(s[tier + "_bytes"])}</span>`;
}
function rates(samples) {  // hit rate between consecutive heartbeats that saw lookups
  const out = [];
  for (let i = 1; i < samples.length; i++) {
    const [t, s] = samples[i], p = samples[i - 1][1];
    const looked = s.lookup_tokens - p.lookup_tokens;
    if (looked > 0) out.push([t, (s.hit_tokens - p.hit_tokens) / looked]);
  }
  return out;
}
function cumulative(samples) {
  const s = samples.length ? samples[samples.length - 1][1] : null;
  return s && s.lookup_tokens > 0 ? s.hit_tokens / s.lookup_tokens : null;
}
function chart(history) {
  const svg = document.getElementById("chart"), W = 900, H = 260, L = 40, B = 24;
  const ids = Object.keys(history), span = 120;
  let html = `<line x1="${L}" y1="${H - B}" x2="${W}" y2="${H - B}" stroke="#999"/>`;
  for (const y of [0, 0.5, 1]) {
    const py = (H - B) - y * (H - B - 10);
    html += `<text x="4" y="${py + 4}" font-size="11">${y * 100}%</text>` +
            `<line x1="${L}" y1="${py}" x2="${W}" y2="${py}" stroke="#eee"/>`;
  }
  html += `<text x="${L}" y="${H - 6}" font-size="11">-${span} s</text>` +
          `<text x="${W - 30}" y="${H - 6}" font-size="11">now</text>`;
  let legend = "";
  ids.forEach((id, k) => {
    const pts = rates(history[id]).filter(([t]) => t > -span)
      .map(([t, r]) => `${(L + (W - L) * (1 + t / span)).toFixed(1)},${((H - B) - r * (H - B - 10)).toFixed(1)}`);
    const c = COLORS[k % COLORS.length];
    if (pts.length) html += `<polyline class="series" data-id="${esc(id)}" fill="none" stroke="${c}" ` +
                            `stroke-width="2" points="${pts.join(" ")}"/>`;
    for (const p of pts) {  // a dot per measurement: a single one draws no line
      const [x, y] = p.split(",");
      html += `<circle cx="${x}" cy="${y}" r="3" fill="${c}"/>`;
    }
    legend += `<span style="color:${c};margin-right:16px">■ ${esc(id)}</span>`;
  });
  svg.innerHTML = html;
  document.getElementById("legend").innerHTML = legend;
}
async function refresh() {
  try {
    const [health, insts, history] = await Promise.all([get("/health"), get("/instances"), get("/history")]);
    document.getElementById("summary").textContent =
      `${health.alive} of ${health.instances} instances alive · ${health.chunks.toLocaleString()} chunks indexed`;
    document.getElementById("rows").innerHTML = insts.map((i) => {
      const h = history[i.id] || [], s = h.length ? h[h.length - 1][1] : null;
      return `<tr class="${i.alive ? "alive" : "dead"}" data-id="${esc(i.id)}"><td class="id">${esc(i.id)}</td>` +
        `<td><span class="dot"></span>${i.alive ? (i.synced ? "alive" : "syncing") : "dead"}</td>` +
        `<td>${esc(i.model)}</td><td class="num">${i.chunks.l1}</td><td class="num">${i.chunks.l2}</td>` +
        `<td>${usage(s, "l1")}</td><td>${usage(s, "l2")}</td>` +
        `<td class="num hit">${pct(cumulative(h))}</td><td class="num">${i.silent_s.toFixed(1)} s ago</td></tr>`;
    }).join("");
    chart(history);
  } catch (e) {
    document.getElementById("summary").innerHTML = `<span class="err">${e.message}</span>`;
  }
}
refresh();
setInterval(refresh, 2000);
</script></body></html>
"""
