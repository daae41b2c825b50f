// Live charts of the last ten minutes, drawn as SVG polylines: no library, no build step.
// A Chart keeps, per series (the cluster total and each node), [time in ms, value] points; a value of null
// leaves a gap (a node without publishes has no p99).
"use strict";

import { duration } from "./format.js";

const SVG = "http://www.w3.org/2000/svg";
export const WINDOW_MS = 10 * 60 * 1000;
const MIN_SPAN_MS = 30 * 1000;
const WIDTH = 600;
const HEIGHT = 160;
const PAD = { left: 44, right: 8, top: 8, bottom: 18 };
export const TOTAL = "cluster";
// Colour-blind-safe palette (Okabe-Ito) for nodes; the cluster line uses the accent colour from style.css.
const PALETTE = ["#e69f00", "#56b4e9", "#009e73", "#cc79a7", "#d55e00", "#0072b2", "#f0e442"];

const element = (name, attributes = {}) => {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  return node;
};

export class Chart {
  constructor(container, { title, format, total }) {
    this.format = format;
    this.total = total; // how the cluster line is made from the nodes' values: "sum" or "max"
    this.series = new Map();
    this.colors = new Map();
    const figure = document.createElement("figure");
    figure.className = "chart";
    const caption = document.createElement("figcaption");
    this.current = document.createElement("span");
    this.current.className = "current";
    caption.append(title, " ", this.current);
    this.svg = element("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", "aria-label": title });
    this.legend = document.createElement("div");
    this.legend.className = "legend";
    figure.append(caption, this.svg, this.legend);
    container.append(figure);
    this.figure = figure;
  }

  color(name) {
    if (name === TOTAL) return "var(--accent)";
    if (!this.colors.has(name)) this.colors.set(name, PALETTE[this.colors.size % PALETTE.length]);
    return this.colors.get(name);
  }

  // values: node id -> number or null, at time `now` (ms). The cluster total is derived here.
  add(now, values) {
    const present = Object.values(values).filter((value) => value !== null && value !== undefined);
    const total = present.length === 0 ? null
      : this.total === "max" ? Math.max(...present) : present.reduce((a, b) => a + b, 0);
    for (const [name, value] of [[TOTAL, total], ...Object.entries(values)]) {
      if (!this.series.has(name)) this.series.set(name, []);
      this.series.get(name).push([now, value ?? null]);
    }
    for (const [name, points] of this.series) {
      while (points.length && points[0][0] < now - WINDOW_MS) points.shift();
      if (!points.length) this.series.delete(name);
    }
    this.draw(now);
  }

  draw(now) {
    const all = [...this.series.values()].flat().map(([, value]) => value).filter((value) => value !== null);
    const peak = Math.max(0, ...all);
    const top = niceCeiling(peak);
    // Until ten minutes have been seen, the axis spans what has been (a fresh page is not a flat line).
    const first = Math.min(now, ...[...this.series.values()].map((points) => points[0][0]));
    const span = Math.max(MIN_SPAN_MS, Math.min(WINDOW_MS, now - first));
    const x = (t) => PAD.left + ((t - (now - span)) / span) * (WIDTH - PAD.left - PAD.right);
    const y = (v) => HEIGHT - PAD.bottom - (v / top) * (HEIGHT - PAD.top - PAD.bottom);
    const children = [];
    for (const fraction of [0, 0.5, 1]) {
      const level = y(top * fraction);
      children.push(element("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: level, y2: level, class: "grid" }));
      const label = element("text", { x: PAD.left - 4, y: level + 4, class: "axis", "text-anchor": "end" });
      label.textContent = this.format(top * fraction);
      children.push(label);
    }
    for (const [fraction, anchor] of [[1, "start"], [0.5, "middle"], [0, "end"]]) {
      const label = element("text", { x: x(now - span * fraction), y: HEIGHT - 4, class: "axis", "text-anchor": anchor });
      label.textContent = fraction ? `−${duration((span * fraction) / 1000)}` : "now";
      children.push(label);
    }
    // Nodes first, the cluster line on top.
    const names = [...this.series.keys()].filter((name) => name !== TOTAL);
    if (this.series.has(TOTAL)) names.push(TOTAL);
    for (const name of names) {
      const kind = name === TOTAL ? "total" : "node";
      for (const run of runs(this.series.get(name))) {
        if (run.length === 1) { // one value between gaps: a dot, a line would have no length
          const [t, v] = run[0];
          children.push(element("circle", { cx: x(t), cy: y(v), r: 3, class: `dot ${kind}`, "data-series": name,
            ...(name === TOTAL ? {} : { fill: this.color(name) }) }));
          continue;
        }
        const points = run.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
        children.push(element("polyline", { points, fill: "none", class: `line ${kind}`, "data-series": name,
          ...(name === TOTAL ? {} : { stroke: this.color(name) }) }));
      }
    }
    this.svg.replaceChildren(...children);
    const last = this.series.get(TOTAL)?.at(-1)?.[1];
    this.current.textContent = last === null || last === undefined ? "–" : this.format(last);
    this.figure.dataset.last = last ?? "";
    this.figure.dataset.peak = peak;
    this.drawLegend(names);
  }

  drawLegend(names) {
    const items = names.map((name) => {
      const item = document.createElement("span");
      const swatch = document.createElement("i");
      swatch.style.background = this.color(name);
      item.append(swatch, name === TOTAL ? (this.total === "max" ? "cluster (worst node)" : "cluster") : name);
      return item;
    });
    this.legend.replaceChildren(...items.reverse());
  }
}

// The unbroken stretches of a series (a null value breaks it).
function runs(points) {
  const result = [];
  let current = [];
  for (const point of points) {
    if (point[1] === null) {
      if (current.length) result.push(current);
      current = [];
    } else current.push(point);
  }
  if (current.length) result.push(current);
  return result;
}

// 1, 2 or 5 times a power of ten, at or above `value` (at least 1): round axis labels.
function niceCeiling(value) {
  if (value <= 1) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}
