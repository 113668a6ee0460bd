// Audio level of a MediaStream, measured with a Web Audio AnalyserNode. Analysis only: the node is never
// connected to the speakers (speech plays from the WebRTC track through an <audio> element).
export class LevelMeter {
  constructor(context, stream) {
    this.source = context.createMediaStreamSource(stream);
    this.analyser = context.createAnalyser();
    this.analyser.fftSize = 1024;
    this.buffer = new Float32Array(this.analyser.fftSize);
    this.source.connect(this.analyser);
  }

  /** RMS of the latest window, scaled so that normal speech is roughly 0.2–0.8 (clamped to 1). */
  level() {
    this.analyser.getFloatTimeDomainData(this.buffer);
    let sum = 0;
    for (const v of this.buffer) sum += v * v;
    return Math.min(1, Math.sqrt(sum / this.buffer.length) * 4);
  }

  stop() {
    this.source.disconnect();
  }
}
