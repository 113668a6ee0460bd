// Bundled by tests/realtime_js_bundle.py (esbuild) for tests/test_realtime_browser.py: a page that drives our
// server with OpenAI's own Realtime agents SDK over WebRTC.
import { OpenAIRealtimeWebRTC, RealtimeAgent, RealtimeSession } from '@openai/agents-realtime';

window.realtimeTest = {
  events: [],
  errors: [],
  async connect(baseUrl, instructions) {
    const agent = new RealtimeAgent({ name: 'tester', instructions });
    const audioElement = document.createElement('audio');
    document.body.appendChild(audioElement);
    const transport = new OpenAIRealtimeWebRTC({ baseUrl: `${baseUrl}/v1/realtime/calls`, audioElement });
    transport.on('*', (event) => this.events.push(event));
    const session = new RealtimeSession(agent, { transport, model: 'minicpm-o-4.5' });
    session.on('error', (error) => this.errors.push(String(error?.error?.message ?? error?.error ?? error)));
    // an ephemeral-looking key: the SDK refuses plain keys in a browser; the test server has no api_token
    await session.connect({ apiKey: 'ek_test_without_auth' });
    this.session = session;
    this.transport = transport;
    return transport.connectionState.callId ?? null;
  },
  send(text) {
    this.session.sendMessage(text);
  },
  types() {
    return this.events.map((event) => event.type);
  },
  async inboundAudio() {
    const pc = this.transport.connectionState.peerConnection;
    const stats = await pc.getStats();
    let energy = 0;
    let samples = 0;
    stats.forEach((report) => {
      if (report.type === 'inbound-rtp' && report.kind === 'audio') {
        energy += report.totalAudioEnergy ?? 0;
        samples += report.totalSamplesReceived ?? 0;
      }
    });
    return { energy, samples };
  },
  close() {
    this.session?.close();
  },
};
