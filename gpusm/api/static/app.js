// gpusm dashboard: plain JavaScript, no build step, nothing from another origin.
//
// Reads GET /gpu/status, GET /gpu/timeline and the event stream (GET /gpu/events/stream,
// read with fetch() so that it can carry headers and resume with Last-Event-ID). The
// buttons POST to /gpu/services/{name}/{start,stop,reset} and /gpu/release with the
// token the user typed once: it lives in sessionStorage (this tab only) and travels in
// the Authorization header, never in a URL.
"use strict";

(() => {
  const TOKEN_KEY = "gpusm.token";
  // The same palette, in the same order, as gpusm/timeline/render.py (the offline chart).
  const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
  const ACTIVE = new Set(["starting", "healthy", "draining", "parking", "parked", "waking"]);
  const MAX_EVENTS = 1000;
  const STATUS_EVERY_MS = 2000;
  const TIMELINE_EVERY_MS = 15000;

  const view = {
    status: null,
    statusAt: 0,
    names: [],
    events: [],
    types: new Set(),
    lastSeq: null,
    freshAfter: Infinity,
    unreadable: false,
    answer: null,
    charts: [],
  };

  const $ = (selector) => document.querySelector(selector);

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value === undefined || value === null) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key === "style") Object.assign(node.style, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  // ------------------------------------------------------------------ HTTP
  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  function headers(extra = {}) {
    const found = { Accept: "application/json", ...extra };
    const kept = token();
    if (kept) found.Authorization = `Bearer ${kept}`;
    return found;
  }

  async function failure(response) {
    let detail = response.statusText;
    try {
      const body = await response.json();
      detail = body.detail || body.title || detail;
    } catch (_) { /* not JSON */ }
    const error = new Error(`${response.status} ${detail}`);
    error.status = response.status;
    return error;
  }

  async function getJson(path) {
    const response = await fetch(path, { headers: headers(), cache: "no-store" });
    if (!response.ok) throw await failure(response);
    return response.json();
  }

  async function post(path, body) {
    const response = await fetch(path, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
    });
    if (!response.ok) throw await failure(response);
    return response.json();
  }

  function say(text, ok = false) {
    const box = $("#message");
    box.textContent = text;
    box.classList.toggle("ok", ok);
    box.hidden = !text;
  }

  // ------------------------------------------------------------------ formatting
  const mib = (n) => (n === null || n === undefined ? "" : Number(n).toLocaleString("en-US"));

  function clock(date) {
    const pad = (n, w = 2) => String(n).padStart(w, "0");
    return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}.${pad(date.getMilliseconds(), 3)}`;
  }

  function duration(seconds) {
    if (seconds < 60) return `${seconds.toFixed(1)}s`;
    const s = Math.floor(seconds);
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    if (h >= 24) return `${Math.floor(h / 24)}d ${h % 24}h`;
    return h ? `${h}h ${String(m).padStart(2, "0")}m` : `${m}m ${String(s % 60).padStart(2, "0")}s`;
  }

  function colour(name) {
    let index = view.names.indexOf(name);
    if (index < 0) {
      view.names.push(name);
      index = view.names.length - 1;
    }
    return PALETTE[index % PALETTE.length];
  }

  function knowNames(names) {
    // Colours follow the sorted configured names, as in the offline chart.
    const all = new Set([...view.names, ...names]);
    const sorted = [...names].sort();
    view.names = [...sorted, ...[...all].filter((n) => !sorted.includes(n))];
  }

  // ------------------------------------------------------------------ status
  async function refreshStatus() {
    try {
      const status = await getJson("/gpu/status");
      view.status = status;
      view.statusAt = performance.now();
      knowNames(status.services.map((s) => s.name));
      renderStatus();
      if (view.unreadable) say("");  // the daemon answers again
      view.unreadable = false;
    } catch (error) {
      view.unreadable = true;
      say(`cannot read /gpu/status: ${error.message}`);
    }
  }

  function devicesOf(service) {
    return service.devices && service.devices.length ? service.devices : [service.gpu];
  }

  function renderDevices(status) {
    const box = $("#devices");
    box.replaceChildren();
    for (const device of status.devices) {
      let reserved = 0;
      let ours = 0;
      for (const service of status.services) {
        if (ACTIVE.has(service.state) && devicesOf(service).includes(device.index)) {
          reserved += service.reservation_mib;
          ours += service.used_mib;
        }
      }
      const total = Math.max(device.total_mib, 1);
      const used = Math.max(device.used_mib - device.foreign_mib, 0);
      const pieces = [
        ["used", used, `used by gpusm's services: ${mib(used)} MiB`],
        ["reserved", Math.max(reserved - used, 0), `reserved, not yet used: ${mib(Math.max(reserved - used, 0))} MiB`],
        ["foreign", device.foreign_mib, `foreign (not gpusm's): ${mib(device.foreign_mib)} MiB`],
        ["free", device.free_for_admission_mib, `free for admission: ${mib(device.free_for_admission_mib)} MiB`],
      ];
      let left = total;
      const bar = el("div", { class: "bar", role: "img", "aria-label": `GPU ${device.index} memory` });
      for (const [kind, value, title] of pieces) {
        const width = Math.max(Math.min(value, left), 0);
        left -= width;
        bar.append(el("div", { class: kind, title, style: { width: `${(100 * width) / total}%` } }));
      }
      box.append(
        el("div", { class: "device", dataset: { device: device.index } },
          el("div", { class: "device-title" },
            el("strong", { text: `GPU ${device.index} · ${device.name}` }),
            el("span", { class: "muted", text: device.error ? `error: ${device.error}` : "" })),
          bar,
          el("div", { class: "legend" },
            el("span", { text: `total ${mib(device.total_mib)} MiB` }),
            el("span", {}, el("span", { class: "swatch used" }), `used ${mib(device.used_mib)}`),
            el("span", {}, el("span", { class: "swatch reserved" }), `reserved ${mib(reserved)}`),
            el("span", {}, el("span", { class: "swatch foreign" }), `foreign ${mib(device.foreign_mib)}`),
            el("span", {}, el("span", { class: "swatch free" }), `free for admission ${mib(device.free_for_admission_mib)}`),
            el("span", { class: "muted", text: `(driver free ${mib(device.free_mib)}; gpusm's processes use ${mib(ours)})` }))));
    }
  }

  function serviceRow(service) {
    let row = document.querySelector(`#services tr[data-service="${CSS.escape(service.name)}"]`);
    if (row) return row;
    const button = (verb, label) => el("button", {
      type: "button", class: verb, text: label, dataset: { verb },
      onclick: (event) => act(service.name, verb, event.currentTarget),
    });
    row = el("tr", { dataset: { service: service.name } },
      el("td", { class: "name" }, el("span", { class: "swatch", style: { background: colour(service.name) } }), service.name),
      el("td", {}, el("span", { class: "state" })),
      el("td", { class: "gpu" }),
      el("td", { class: "pid" }),
      el("td", { class: "used num" }),
      el("td", { class: "reserved num" }),
      el("td", { class: "priority num" }),
      el("td", { class: "lease" }),
      el("td", { class: "in-state num" }),
      el("td", { class: "error" }),
      el("td", { class: "actions" },
        button("start", "start"), button("stop", "stop"), button("reset", "reset"),
        button("release", "release")));
    $("#services tbody").append(row);
    return row;
  }

  function setState(row, state) {
    const badge = row.querySelector(".state");
    badge.textContent = state;
    badge.className = `state state-${state}`;
    row.dataset.state = state;
    const busy = (verb) => row.querySelector(`button.${verb}`).classList.contains("busy");
    row.querySelector("button.start").disabled = busy("start") || state !== "stopped";
    row.querySelector("button.stop").disabled = busy("stop") || !ACTIVE.has(state);
    row.querySelector("button.reset").disabled = busy("reset") || state !== "failed";
  }

  function renderStatus() {
    const status = view.status;
    if (!status) return;
    $("#config").textContent = status.config_hash
      ? `config ${status.config_hash}, loaded ${clock(new Date(status.config_loaded_at))}` : "";
    renderDevices(status);
    const names = new Set();
    for (const service of status.services) {
      names.add(service.name);
      const row = serviceRow(service);
      setState(row, service.state);
      row.dataset.inStateS = service.in_state_s;
      row.querySelector(".gpu").textContent = service.state === "stopped" ? "" : devicesOf(service).join(",");
      row.querySelector(".pid").textContent = service.container_id
        ? service.container_id.slice(0, 12) : (service.pid ?? "");
      row.querySelector(".used").textContent = mib(service.used_mib);
      row.querySelector(".reserved").textContent = ACTIVE.has(service.state) ? mib(service.reservation_mib) : "";
      row.querySelector(".priority").textContent = service.priority;
      row.querySelector(".lease").textContent = service.leased_by.join(", ");
      row.querySelector(".error").textContent = service.last_error || "";
      row.querySelector("button.release").disabled = !service.leased_by.length;
      row.querySelector("button.release").title = service.leased_by.length
        ? `release the lease of ${service.leased_by.join(", ")}` : "no client holds it";
    }
    for (const row of document.querySelectorAll("#services tbody tr")) {
      if (!names.has(row.dataset.service)) row.remove();
    }
    tickInState();
    fillFilter("#filter-service", [...names].sort());
  }

  function tickInState() {
    const since = (performance.now() - view.statusAt) / 1000;
    for (const row of document.querySelectorAll("#services tbody tr")) {
      const base = Number(row.dataset.inStateS);
      if (!Number.isNaN(base)) row.querySelector(".in-state").textContent = duration(base + since);
    }
  }

  async function act(name, verb, button) {
    if (!token()) {
      say("Type the API token (from $GPUSM_TOKEN or the daemon's api-token file) and press Keep first.");
      $("#token").focus();
      return;
    }
    const row = button.closest("tr");
    button.classList.add("busy");
    button.disabled = true;
    try {
      if (verb === "release") {
        const holders = (row.querySelector(".lease").textContent || "").split(", ").filter(Boolean);
        for (const client of holders) await post("/gpu/release", { client });
        say(`released ${holders.join(", ")}`, true);
      } else {
        await post(`/gpu/services/${encodeURIComponent(name)}/${verb}`, { by: "dashboard" });
        say(`${verb} ${name}: done`, true);
      }
    } catch (error) {
      say(error.status === 401
        ? "The daemon refused the token (401): type the right one and press Keep."
        : `${verb} ${name} failed: ${error.message}`);
    } finally {
      button.classList.remove("busy");
      setState(row, row.dataset.state);
      scheduleStatus();
    }
  }

  // ------------------------------------------------------------------ timeline
  function rangeQuery() {
    const choice = $("#range").value;
    const params = new URLSearchParams();
    if (choice === "custom") {
      const from = $("#range-from").value;
      const to = $("#range-to").value;
      if (from && to && new Date(from) > new Date(to)) throw new Error("“from” is after “to”: swap them");
      if (from) params.set("since", new Date(from).toISOString());
      if (to) params.set("until", new Date(to).toISOString());
    } else if (choice !== "all") {
      params.set("since", new Date(Date.now() - Number(choice) * 1000).toISOString());
    }
    return params.toString();
  }

  async function refreshTimeline() {
    let query;
    try {
      query = rangeQuery();
    } catch (error) {
      say(error.message);
      return null;
    }
    try {
      const answer = await getJson(`/gpu/timeline${query ? `?${query}` : ""}`);
      view.answer = answer;
      knowNames(answer.timeline.services);
      renderTimelines(answer);
      return answer;
    } catch (error) {
      say(`cannot read /gpu/timeline: ${error.message}`);
      return null;
    }
  }

  const seconds = (iso) => Date.parse(iso) / 1000;

  function windowOf(answer) {
    const tl = answer.timeline;
    const to = tl.until ? seconds(tl.until) : seconds(answer.now);
    // A window longer than the log is drawn from where the log begins.
    const begins = tl.log_start ? seconds(tl.log_start) : to - 60;
    let from = tl.since ? Math.max(seconds(tl.since), begins) : begins;
    for (const s of tl.segments) from = Math.min(from, seconds(s.start));
    for (const m of tl.markers) from = Math.min(from, seconds(m.at));
    return [from, Math.max(to, from + 1)];
  }

  // The VRAM each service held at each boundary time, stacked in `names` order.
  function stack(segments, names, from, to) {
    const times = new Set([from, to]);
    for (const s of segments) {
      for (const step of s.steps) times.add(seconds(step.at));
      times.add(seconds(s.end));
    }
    const xs = [...times].filter((t) => t >= from && t <= to).sort((a, b) => a - b);
    const held = (name, t) => {
      let value = 0;
      for (const s of segments) {
        if (s.service !== name || t < seconds(s.start) || t >= seconds(s.end)) continue;
        for (const step of s.steps) if (seconds(step.at) <= t) value = step.reserved_mib;
      }
      return value;
    };
    const own = names.map((name) => xs.map((t) => held(name, t)));
    const cumulative = [];
    let below = xs.map(() => 0);
    for (const values of own) {
      below = below.map((b, i) => b + values[i]);
      cumulative.push(below);
    }
    return { xs, own, cumulative };
  }

  function renderTimelines(answer) {
    for (const chart of view.charts) chart.destroy();
    view.charts = [];
    const box = $("#timelines");
    box.replaceChildren();
    const tl = answer.timeline;
    const [from, to] = windowOf(answer);
    if (!tl.devices.length) box.append(el("div", { class: "empty", text: "no device" }));
    for (const device of tl.devices) {
      const segments = tl.segments.filter((s) => s.device === device.index);
      const markers = tl.markers.filter((m) => m.device === device.index || m.device === null);
      const names = view.names.filter((n) => segments.some((s) => s.service === n));
      const panel = el("div", { class: "timeline", dataset: { device: device.index } },
        el("div", { class: "device-title" },
          el("strong", { text: `GPU ${device.index}` }),
          el("span", { class: "muted", text: `${segments.length} segment(s), ${markers.length} marker(s)` })));
      box.append(panel);
      panel.append(el("div", { class: "series-legend" }, ...names.map((n) =>
        el("span", {}, el("span", { class: "swatch", style: { background: colour(n) } }), n))));
      const chartBox = el("div", { class: "chart" });
      const readout = el("div", { class: "readout" });
      panel.append(chartBox, readout);
      const lanes = el("div", { class: "lanes" });
      panel.append(lanes);
      if (!segments.length && !markers.length) {
        panel.append(el("div", { class: "empty", text: "nothing held VRAM on this device in this range" }));
      }
      const { xs, own, cumulative } = stack(segments, names, from, to);
      const stepped = uPlot.paths.stepped({ align: 1 });
      // Drawn from the top of the stack down, each filled to zero: a stacked area.
      const order = names.map((_, i) => i).reverse();
      const width = Math.max(box.clientWidth - 10, 320);
      const top = Math.max(device.total_mib, ...(cumulative.length ? cumulative[cumulative.length - 1] : [0]), 1);
      const chart = new uPlot({
        width,
        height: 230,
        legend: { show: false },
        cursor: { drag: { x: false, y: false } },
        scales: { x: { time: true, range: [from, to] }, y: { range: [0, top] } },
        axes: [{}, { size: 120, label: "MiB", values: (_, ticks) => ticks.map(mib) }],
        series: [{}, ...order.map((i) => ({
          label: names[i], stroke: colour(names[i]), fill: colour(names[i]), width: 1,
          paths: stepped, points: { show: false },
        }))],
        hooks: {
          // Sizes are known once uPlot has laid itself out.
          ready: [(u) => renderLanes(lanes, u, segments, from, to)],
          draw: [(u) => placeMarkers(u, markers)],
          setCursor: [(u) => {
            const i = u.cursor.idx;
            if (i === null || i === undefined) { readout.textContent = ""; return; }
            const parts = names.map((n, k) => `${n} ${mib(own[k][i])}`).filter((_, k) => own[k][i]);
            readout.textContent = `${clock(new Date(xs[i] * 1000))}  ${parts.join(" · ") || "nothing held"}`;
          }],
        },
      }, [xs, ...order.map((i) => cumulative[i])], chartBox);
      view.charts.push(chart);
    }
  }

  function describe(marker) {
    return `${marker.type}: ${marker.service} at ${clock(new Date(marker.at))}\n${marker.reason}`;
  }

  function placeMarkers(u, markers) {
    for (const old of u.over.querySelectorAll(".marker")) old.remove();
    for (const marker of markers) {
      const x = u.valToPos(seconds(marker.at), "x");
      if (x < 0 || x > u.over.clientWidth) continue;
      // The tooltip is drawn at once on hover (a title would show a second one, late).
      u.over.append(el("div", {
        class: `marker ${marker.kind}`,
        role: "img",
        "aria-label": describe(marker),
        dataset: { kind: marker.kind, service: marker.service, seq: marker.seq, reason: marker.reason },
        style: { left: `${x}px` },
        onmouseenter: (event) => showTip(event, describe(marker)),
        onmouseleave: hideTip,
      }));
    }
  }

  function showTip(event, text) {
    const tip = $("#tooltip");
    tip.textContent = text;
    tip.hidden = false;
    tip.style.left = `${Math.min(event.clientX + 12, window.innerWidth - 460)}px`;
    tip.style.top = `${event.clientY + 12}px`;
  }

  function hideTip() {
    $("#tooltip").hidden = true;
  }

  // One lane per service under the chart, aligned with its plot area: when each
  // instance ran (start to stop), coloured by state.
  function renderLanes(lanes, chart, segments, from, to) {
    lanes.replaceChildren();
    const left = chart.bbox.left / devicePixelRatio;
    const span = chart.bbox.width / devicePixelRatio;
    const names = view.names.filter((n) => segments.some((s) => s.service === n));
    const pct = (t) => (100 * (t - from)) / (to - from);
    for (const name of names) {
      const track = el("div", { class: "lane-track", style: { width: `${span}px`, flex: "none" } });
      for (const s of segments.filter((x) => x.service === name)) {
        const start = seconds(s.start);
        const end = seconds(s.end);
        const title = `${name} on GPU ${s.device}: ${clock(new Date(s.start))} → ${clock(new Date(s.end))}`
          + ` (${s.open ? "still running" : s.end_type}), up to ${mib(Math.max(...s.steps.map((x) => x.reserved_mib)))} MiB`;
        const bar = el("div", {
          class: `segment${s.open ? " open" : ""}`,
          title,
          dataset: {
            service: name, device: s.device, start: s.start, end: s.end,
            startSeq: s.start_seq, endSeq: s.end_seq ?? "", endType: s.end_type ?? "", open: s.open,
          },
          style: { left: `${pct(start)}%`, width: `${Math.max(pct(end) - pct(start), 0)}%` },
        });
        s.steps.forEach((step, i) => {
          const stepEnd = i + 1 < s.steps.length ? seconds(s.steps[i + 1].at) : end;
          const share = end > start ? (100 * (stepEnd - seconds(step.at))) / (end - start) : 100;
          bar.append(el("div", {
            class: `step ${step.state}`,
            title: `${step.state} from ${clock(new Date(step.at))}, ${mib(step.reserved_mib)} MiB`,
            style: { width: `${share}%`, background: colour(name) },
          }));
        });
        track.append(bar);
      }
      lanes.append(el("div", { class: "lane", dataset: { service: name } },
        el("div", { class: "lane-name", text: name, style: { width: `${left}px` } }), track));
    }
  }

  // ------------------------------------------------------------------ events
  function fillFilter(selector, values) {
    const select = $(selector);
    const have = new Set([...select.options].map((o) => o.value));
    for (const value of values) {
      if (!have.has(value)) select.append(el("option", { value, text: value }));
    }
  }

  function details(event) {
    const data = event.data || {};
    if (data.reason) return data.reason;
    return Object.entries(data)
      .filter(([, v]) => v !== null && typeof v !== "object")
      .map(([k, v]) => `${k}=${v}`).join(" ");
  }

  function matches(event) {
    const service = $("#filter-service").value;
    const type = $("#filter-type").value;
    const text = $("#filter-text").value.trim().toLowerCase();
    if (service && event.stream !== service) return false;
    if (type && event.type !== type) return false;
    if (!type && event.type === "VramObserved" && !$("#filter-vram").checked) return false;
    if (text && !JSON.stringify(event).toLowerCase().includes(text)) return false;
    return true;
  }

  function eventRow(event) {
    const move = event.to_state
      ? (event.from_state && event.from_state !== event.to_state ? `${event.from_state} → ${event.to_state}` : event.to_state)
      : "";
    return el("tr", { dataset: { seq: event.seq, stream: event.stream, type: event.type } },
      el("td", { class: "num", text: event.seq }),
      el("td", { text: clock(new Date(event.at)), title: event.at }),
      el("td", { text: event.stream }),
      el("td", { text: event.type }),
      el("td", { text: move }),
      el("td", { class: "details", text: details(event) }));
  }

  function renderEvents() {
    const body = $("#events tbody");
    const shown = view.events.filter(matches);
    body.replaceChildren(...shown.slice().reverse().map(eventRow));
    $("#event-count").textContent = `${shown.length} of the newest ${view.events.length} shown`;
  }

  function onEvent(event) {
    view.events.push(event);
    if (view.events.length > MAX_EVENTS) view.events.shift();
    if (!view.types.has(event.type)) {
      view.types.add(event.type);
      fillFilter("#filter-type", [...view.types].sort());
    }
    if (matches(event)) {
      const body = $("#events tbody");
      const row = eventRow(event);
      if (event.seq > view.freshAfter) row.classList.add("fresh");
      body.prepend(row);
      while (body.rows.length > MAX_EVENTS) body.deleteRow(body.rows.length - 1);
      $("#event-count").textContent = `${body.rows.length} of the newest ${view.events.length} shown`;
    }
    if (event.stream !== "coordinator" && event.to_state) {
      const row = document.querySelector(`#services tr[data-service="${CSS.escape(event.stream)}"]`);
      if (row && row.dataset.state !== event.to_state) {
        setState(row, event.to_state);
        row.dataset.inStateS = "0";
        view.statusAt = performance.now();
      }
    }
    scheduleStatus();
    scheduleTimeline();
  }

  function parseBlock(block) {
    let id = null;
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("id:")) id = line.slice(3).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
    }
    if (id === null || !data.length) return;
    view.lastSeq = Number(id);
    onEvent(JSON.parse(data.join("\n")));
  }

  function connection(state, text) {
    const badge = $("#conn");
    badge.dataset.state = state;
    badge.textContent = text;
  }

  async function stream(afterSeq) {
    for (;;) {
      try {
        const extra = view.lastSeq === null ? {} : { "Last-Event-ID": String(view.lastSeq) };
        const response = await fetch(`/gpu/events/stream?after_seq=${afterSeq}&heartbeat_s=10`, {
          headers: headers({ Accept: "text/event-stream", ...extra }),
          cache: "no-store",
        });
        if (!response.ok) throw await failure(response);
        connection("live", "live");
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            parseBlock(buffer.slice(0, end));
            buffer = buffer.slice(end + 2);
          }
        }
        connection("reconnecting", "stream ended; reconnecting…");
      } catch (error) {
        connection("reconnecting", `reconnecting… (${error.message})`);
      }
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }

  // ------------------------------------------------------------------ wiring
  function debounce(fn, ms) {
    let timer = null;
    return () => {
      if (timer !== null) return;
      timer = setTimeout(() => { timer = null; fn(); }, ms);
    };
  }

  const scheduleStatus = debounce(refreshStatus, 100);
  const scheduleTimeline = debounce(refreshTimeline, 500);

  function showTokenState() {
    $("#token-state").textContent = token() ? "kept for this tab" : "not set: view only";
  }

  function wire() {
    $("#token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("#token").value.trim();
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      $("#token").value = "";
      showTokenState();
      say("");
    });
    $("#token-forget").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      showTokenState();
    });
    $("#range").addEventListener("change", () => {
      $("#custom-range").hidden = $("#range").value !== "custom";
      if ($("#range").value !== "custom") refreshTimeline();
    });
    $("#range-apply").addEventListener("click", () => refreshTimeline());
    for (const id of ["#filter-service", "#filter-type", "#filter-vram"]) {
      $(id).addEventListener("change", renderEvents);
    }
    $("#filter-text").addEventListener("input", renderEvents);
    let resizing = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizing);
      resizing = setTimeout(() => view.answer && renderTimelines(view.answer), 200);
    });
  }

  async function start() {
    wire();
    showTokenState();
    await refreshStatus();
    const answer = await refreshTimeline();
    const head = answer ? answer.head_seq : 0;
    view.freshAfter = head;
    setInterval(refreshStatus, STATUS_EVERY_MS);
    setInterval(tickInState, 1000);
    setInterval(() => { if ($("#range").value !== "custom") refreshTimeline(); }, TIMELINE_EVERY_MS);
    document.body.dataset.ready = "true";
    stream(Math.max(head - MAX_EVENTS, 0));
  }

  start();
})();
