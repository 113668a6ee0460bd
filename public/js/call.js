// Minimal call page: microphone -> RTCPeerConnection -> POST /api/sessions; the server's speech comes
// back as a WebRTC track played by an <audio> element (so the browser's echo canceller can see it).
"use strict";

const AUDIO_CONSTRAINTS = { echoCancellation: true, noiseSuppression: true, autoGainControl: true };
const state = { pc: null, channel: null, sessionId: null, stream: null, events: [], constraints: null };
window.callState = state; // read by the browser test

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

function log(line) {
  const el = $("log");
  el.textContent += `${new Date().toISOString().slice(11, 23)} ${line}\n`;
  el.scrollTop = el.scrollHeight;
}

function authHeaders() {
  const token = params.get("token") || localStorage.getItem("apiToken");
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function onEvent(event) {
  state.events.push(event);
  if (event.type === "state") $("state").textContent = event.state;
  else if (event.type === "queue") $("queue").textContent = `#${event.position}, ~${event.eta_s} s`;
  else if (event.type === "session") $("queue").textContent = event.phase === "queued" ? "waiting" : "–";
  if (event.type !== "metrics") log(JSON.stringify(event));
}

function waitForIceGathering(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") { pc.removeEventListener("icegatheringstatechange", done); resolve(); } };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, 2000); // enough host candidates by then; the rest would only add routes
  });
}

async function start() {
  $("start").disabled = true;
  $("status").textContent = "requesting microphone";
  state.constraints = { audio: AUDIO_CONSTRAINTS, video: false };
  state.stream = await navigator.mediaDevices.getUserMedia(state.constraints);
  const pc = new RTCPeerConnection();
  state.pc = pc;
  state.stream.getTracks().forEach((track) => pc.addTrack(track, state.stream));
  pc.ontrack = (ev) => { $("remote").srcObject = ev.streams[0] || new MediaStream([ev.track]); };
  pc.onconnectionstatechange = () => {
    $("status").textContent = pc.connectionState;
    if (["failed", "closed"].includes(pc.connectionState)) stop();
  };
  const channel = pc.createDataChannel("events");
  state.channel = channel;
  channel.onmessage = (ev) => onEvent(JSON.parse(ev.data));
  await pc.setLocalDescription(await pc.createOffer());
  await waitForIceGathering(pc);
  const resp = await fetch("/api/sessions", {
    method: "POST",
    headers: { "Content-Type": "application/json", ...authHeaders() },
    body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer", mode: $("mode").value }),
  });
  const body = await resp.json();
  if (!resp.ok) {
    log(`error ${resp.status}: ${body.error.code}: ${body.error.message}`);
    $("status").textContent = "failed";
    await stop();
    return;
  }
  state.sessionId = body.session_id;
  await pc.setRemoteDescription({ type: body.type, sdp: body.sdp });
  $("status").textContent = "connecting";
  $("stop").disabled = false;
}

async function stop() {
  $("stop").disabled = true;
  const id = state.sessionId;
  state.sessionId = null;
  if (id) await fetch(`/api/sessions/${id}`, { method: "DELETE", headers: authHeaders() }).catch(() => {});
  if (state.pc) state.pc.close();
  if (state.stream) state.stream.getTracks().forEach((t) => t.stop());
  state.pc = null;
  $("start").disabled = false;
  if ($("status").textContent !== "failed") $("status").textContent = "idle";
}

$("start").onclick = () => start().catch((err) => { log(`error: ${err}`); $("start").disabled = false; });
$("stop").onclick = () => stop();
if (params.get("mode")) $("mode").value = params.get("mode");
if (params.get("autostart") === "1") $("start").click();
