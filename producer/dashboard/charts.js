// Two small SVG charts drawn from the stats API's buckets: attempts stacked by outcome, and
// latency p50/p95. No chart library: the page must work with nothing but the producer.

import { h, svg } from './dom.js';
import { count, exactTime, outcomeLabel } from './format.js';
import { t } from './i18n.js';

const WIDTH = 600;
const HEIGHT = 150;
const PAD = { left: 40, right: 8, top: 8, bottom: 22 };

// Outcomes in drawing order, each with its colour class.
const OUTCOMES = ['success', 'http_3xx', 'http_4xx', 'http_410', 'http_5xx', 'timeout', 'connect_error', 'tls_error', 'invalid_response'];

function frame(label, max, points, body) {
  const plotW = WIDTH - PAD.left - PAD.right;
  const plotH = HEIGHT - PAD.top - PAD.bottom;
  const first = points[0]?.start;
  const last = points[points.length - 1]?.start;
  return svg('svg', { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: 'img', 'aria-label': label, class: 'chart' },
    svg('title', {}, label),
    svg('line', { x1: PAD.left, x2: WIDTH - PAD.right, y1: PAD.top + plotH, y2: PAD.top + plotH, class: 'axis' }),
    svg('line', { x1: PAD.left, x2: WIDTH - PAD.right, y1: PAD.top, y2: PAD.top, class: 'grid' }),
    svg('text', { x: PAD.left - 4, y: PAD.top + 4, class: 'tick', 'text-anchor': 'end' }, count(max)),
    svg('text', { x: PAD.left - 4, y: PAD.top + plotH, class: 'tick', 'text-anchor': 'end' }, '0'),
    first && svg('text', { x: PAD.left, y: HEIGHT - 6, class: 'tick' }, new Date(first).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })),
    last && svg('text', { x: WIDTH - PAD.right, y: HEIGHT - 6, class: 'tick', 'text-anchor': 'end' }, new Date(last).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })),
    body(plotW, plotH));
}

function legend(entries) {
  return h('ul', { class: 'legend' }, entries.map(([cls, label]) => h('li', {}, h('span', { class: `swatch ${cls}`, 'aria-hidden': 'true' }), label)));
}

// Attempts per bucket, stacked by outcome; each bar has a tooltip with its counts.
export function outcomesChart(points) {
  const total = (p) => p.attempts;
  const max = Math.max(1, ...points.map(total));
  const present = OUTCOMES.filter((o) => points.some((p) => p.counts[o]));
  const chart = frame(t('chart_outcomes'), max, points, (plotW, plotH) => {
    const slot = plotW / points.length;
    return svg('g', {}, points.map((p, i) => {
      let y = PAD.top + plotH;
      const tip = [exactTime(p.start), ...present.filter((o) => p.counts[o]).map((o) => `${outcomeLabel(o)}: ${count(p.counts[o])}`)].join('\n');
      return svg('g', { class: 'bar' }, svg('title', {}, tip), present.map((o) => {
        const n = p.counts[o] || 0;
        const height = (n / max) * plotH;
        y -= height;
        return n ? svg('rect', { x: PAD.left + i * slot + slot * 0.15, y, width: slot * 0.7, height, class: `fill-${o}` }) : null;
      }));
    }));
  });
  return h('figure', { class: 'chart-box' }, h('figcaption', {}, t('chart_outcomes')), chart, legend(present.map((o) => [`fill-${o}`, outcomeLabel(o)])));
}

// p50 and p95 latency per bucket (bucket upper bounds, as the API reports them).
export function latencyChart(points) {
  const values = points.flatMap((p) => [p.latency_p50_ms, p.latency_p95_ms]).filter((v) => v !== null && v !== undefined);
  const max = Math.max(1, ...values);
  const chart = frame(t('chart_latency'), max, points, (plotW, plotH) => {
    const slot = plotW / points.length;
    const line = (field, cls) => {
      const segments = [];
      let current = [];
      points.forEach((p, i) => {
        const v = p[field];
        if (v === null || v === undefined) {
          if (current.length) segments.push(current);
          current = [];
          return;
        }
        current.push([PAD.left + i * slot + slot / 2, PAD.top + plotH - (v / max) * plotH]);
      });
      if (current.length) segments.push(current);
      return segments.map((seg) => seg.length === 1
        ? svg('circle', { cx: seg[0][0], cy: seg[0][1], r: 3, class: cls })
        : svg('polyline', { points: seg.map(([x, y]) => `${x},${y}`).join(' '), class: cls }));
    };
    return svg('g', {}, line('latency_p95_ms', 'line-p95'), line('latency_p50_ms', 'line-p50'));
  });
  return h('figure', { class: 'chart-box' }, h('figcaption', {}, t('chart_latency')), chart, legend([['line-p50', 'p50'], ['line-p95', 'p95']]));
}
