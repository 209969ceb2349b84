// /watch?session=<id>&token=<viewer token>: plays a session over WHEP (draft-ietf-wish-whep).
// POST the SDP offer (application/sdp) to /v1/sessions/<id>/whep, apply the 201 answer, keep
// the Location to DELETE on leave. No build step: plain browser JavaScript.
"use strict";

const params = new URLSearchParams(location.search);
const sessionId = params.get("session") || "";
const token = params.get("token") || "";
const video = document.getElementById("video");
const statusEl = document.getElementById("status");
const fpsEl = document.getElementById("fps");

// Read by tests and by anyone curious: what this page is receiving.
window.watchStats = { state: "new", framesDecoded: 0, fps: 0, audioPackets: 0, codec: null, error: null };

let pc = null;
let resource = null;

function show(text) {
  statusEl.textContent = text;
}

function authHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  if (token) headers.Authorization = "Bearer " + token;
  return headers;
}

function iceGathered(peer, timeoutMs) {
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { peer.removeEventListener("icegatheringstatechange", check); resolve(); };
    const check = () => { if (peer.iceGatheringState === "complete") done(); };
    peer.addEventListener("icegatheringstatechange", check);
    setTimeout(done, timeoutMs);
  });
}

async function watch() {
  if (!/^[A-Za-z0-9_-]{1,64}$/.test(sessionId)) {
    throw new Error("add ?session=<session id>&token=<viewer token> to the address");
  }
  pc = new RTCPeerConnection();
  const stream = new MediaStream();
  video.srcObject = stream;
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addTransceiver("audio", { direction: "recvonly" });
  pc.ontrack = (event) => stream.addTrack(event.track);
  pc.onconnectionstatechange = () => {
    window.watchStats.state = pc.connectionState;
    if (pc.connectionState === "connected") show("live");
    if (pc.connectionState === "failed" || pc.connectionState === "closed") show("disconnected (" + pc.connectionState + ")");
  };
  await pc.setLocalDescription(await pc.createOffer());
  await iceGathered(pc, 3000);
  const response = await fetch("/v1/sessions/" + encodeURIComponent(sessionId) + "/whep", {
    method: "POST",
    headers: authHeaders({ "Content-Type": "application/sdp" }),
    body: pc.localDescription.sdp,
  });
  if (response.status !== 201) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).message || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  resource = response.headers.get("Location");
  await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
  show("connecting…");
}

async function leave() {
  const url = resource;
  resource = null;
  if (url) {
    try { await fetch(url, { method: "DELETE", headers: authHeaders(), keepalive: true }); } catch (_) { /* gone */ }
  }
  if (pc) pc.close();
  show("left");
}

let last = null;
setInterval(async () => {
  if (!pc) return;
  const report = await pc.getStats();
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "video") {
      const now = { t: s.timestamp, frames: s.framesDecoded || 0 };
      if (last && now.t > last.t) window.watchStats.fps = (1000 * (now.frames - last.frames)) / (now.t - last.t);
      last = now;
      window.watchStats.framesDecoded = now.frames;
      const codec = s.codecId && report.get(s.codecId);
      if (codec) window.watchStats.codec = codec.mimeType;
    }
    if (s.type === "inbound-rtp" && s.kind === "audio") window.watchStats.audioPackets = s.packetsReceived || 0;
  });
  fpsEl.textContent = window.watchStats.fps ? window.watchStats.fps.toFixed(1) + " fps" : "";
}, 1000);

document.getElementById("unmute").onclick = () => { video.muted = false; video.play(); };
document.getElementById("leave").onclick = leave;
window.addEventListener("pagehide", leave);

watch().catch((error) => {
  window.watchStats.error = String(error.message || error);
  window.watchStats.state = "error";
  show("error: " + window.watchStats.error);
});
