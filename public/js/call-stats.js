// Figures for the statistics overlay: per-unit timings from `metrics` events and transport figures from
// RTCPeerConnection.getStats(). Thresholds give each figure a good / fair / poor colour.
const THRESHOLDS = {
  roundtrip: [500, 1000], // ms, unit complete at the server -> result back
  rtt: [150, 400], // ms, ICE candidate pair round trip
  jitter: [30, 80], // ms
  loss: [1, 5], // percent
};

export function grade(kind, value) {
  const limits = THRESHOLDS[kind];
  if (!limits || value === null || value === undefined || Number.isNaN(value)) return "";
  return value < limits[0] ? "good" : value < limits[1] ? "meh" : "poor";
}

export function median(values) {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

export class CallStats {
  constructor() {
    this.units = [];
    this.last = null;
    this.transport = {};
    this._prev = null;
  }

  addUnit(event) {
    this.last = event;
    this.units.push(event.roundtrip_ms);
    if (this.units.length > 50) this.units.shift();
  }

  async poll(pc) {
    const report = await pc.getStats();
    let pair = null;
    let inbound = null;
    let outbound = null;
    report.forEach((s) => {
      if (s.type === "transport" && s.selectedCandidatePairId) pair = report.get(s.selectedCandidatePairId) || pair;
      else if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded" && !pair) pair = s;
      else if (s.type === "inbound-rtp" && s.kind === "audio") inbound = s;
      else if (s.type === "outbound-rtp" && s.kind === "audio") outbound = s;
    });
    const now = performance.now();
    const t = {};
    if (pair && pair.currentRoundTripTime !== undefined) t.rtt = pair.currentRoundTripTime * 1000;
    if (inbound) {
      if (inbound.jitter !== undefined) t.jitter = inbound.jitter * 1000;
      const got = inbound.packetsReceived || 0;
      const lost = Math.max(0, inbound.packetsLost || 0);
      t.loss = got + lost ? (100 * lost) / (got + lost) : 0;
      t.packets = got;
      t.energy = inbound.totalAudioEnergy || 0;
    }
    const prev = this._prev;
    if (prev && now > prev.at) {
      const dt = (now - prev.at) / 1000;
      if (inbound) t.inKbps = (8 * ((inbound.bytesReceived || 0) - prev.inBytes)) / dt / 1000;
      if (outbound) t.outKbps = (8 * ((outbound.bytesSent || 0) - prev.outBytes)) / dt / 1000;
    }
    this._prev = { at: now, inBytes: inbound ? inbound.bytesReceived || 0 : 0, outBytes: outbound ? outbound.bytesSent || 0 : 0 };
    this.transport = t;
    return t;
  }

  /** [labelKey, value text, grade] rows for the overlay. */
  rows() {
    const fmt = (v, unit, digits = 0) => (v === null || v === undefined ? "–" : `${v.toFixed(digits)} ${unit}`);
    const last = this.last;
    const t = this.transport;
    const p50 = median(this.units);
    return [
      ["stats.unitLatency", fmt(last && last.roundtrip_ms, "ms"), grade("roundtrip", last && last.roundtrip_ms)],
      ["stats.unitLatencyP50", fmt(p50, "ms"), grade("roundtrip", p50)],
      ["stats.handoff", fmt(last && last.handoff_ms, "ms", 1), ""],
      ["stats.compute", fmt(last && last.compute_ms, "ms", 1), ""],
      ["stats.units", last ? String(last.unit) : "–", ""],
      ["stats.rtt", fmt(t.rtt, "ms"), grade("rtt", t.rtt)],
      ["stats.jitter", fmt(t.jitter, "ms"), grade("jitter", t.jitter)],
      ["stats.loss", fmt(t.loss, "%", 1), grade("loss", t.loss)],
      ["stats.bitrate", t.inKbps === undefined ? "–" : `${t.inKbps.toFixed(0)} / ${(t.outKbps || 0).toFixed(0)} kbit/s`, ""],
    ];
  }
}
