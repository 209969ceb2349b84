// Browser client of avatar-server (no build step). Protocol: docs/PROTOCOL.md.
//
// session.start over the WebSocket, then one RTCPeerConnection: video recvonly, audio
// sendrecv (the microphone is attached to that transceiver with replaceTrack, so toggling it
// needs no renegotiation). ICE is not trickled: the offer is sent once gathering completes.

const $ = (id) => document.getElementById(id);

const MAX_SIDE_PX = 2048;          // larger pictures are scaled down before upload
const MAX_UPLOAD_BYTES = 6 << 20;  // below the server's default max_image_bytes (8 MiB)

const ui = {
  video: $("video"), image: $("image"), preview: $("preview"), prompt: $("prompt"),
  start: $("start"), stop: $("stop"), text: $("text"), language: $("language"),
  speak: $("speak"), interrupt: $("interrupt"), mic: $("mic"), log: $("log"), unmute: $("unmute"),
  fps: $("stat-fps"), buffer: $("stat-buffer"), ttff: $("stat-ttff"), jitter: $("stat-jitter"),
  underruns: $("stat-underruns"), rtf: $("stat-rtf"), state: $("stat-state"),
};

let ws = null;
let pc = null;
let micSender = null;
let micStream = null;
let statsTimer = null;
let startedAt = 0;
let utteranceCount = 0;
let lastInbound = null;

function log(text, cls) {
  const item = document.createElement("li");
  item.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  if (cls) item.className = cls;
  ui.log.prepend(item);
  while (ui.log.children.length > 200) ui.log.lastChild.remove();
}

function setRunning(running) {
  ui.start.disabled = running;
  ui.stop.disabled = !running;
  for (const el of [ui.text, ui.language, ui.speak, ui.interrupt, ui.mic]) el.disabled = !running;
}

function send(message) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message));
}

// The chosen file as base64 (scaled down first when it is very large).
async function imageAsBase64(file) {
  const bitmap = await createImageBitmap(file);
  const scale = Math.min(1, MAX_SIDE_PX / Math.max(bitmap.width, bitmap.height));
  let blob = file;
  if (scale < 1 || file.size > MAX_UPLOAD_BYTES) {
    const canvas = document.createElement("canvas");
    canvas.width = Math.round(bitmap.width * scale);
    canvas.height = Math.round(bitmap.height * scale);
    canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.92));
  }
  bitmap.close();
  const dataUrl = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
  return String(dataUrl).split(",")[1];
}

function waitForIceGathering(peer) {
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const check = () => {
      if (peer.iceGatheringState === "complete") {
        peer.removeEventListener("icegatheringstatechange", check);
        resolve();
      }
    };
    peer.addEventListener("icegatheringstatechange", check);
    setTimeout(resolve, 3000); // send what we have after 3 s
  });
}

async function startWebRTC() {
  pc = new RTCPeerConnection({ iceServers: [] });
  pc.addTransceiver("video", { direction: "recvonly" });
  micSender = pc.addTransceiver("audio", { direction: "sendrecv" }).sender;
  const remote = new MediaStream();
  ui.video.srcObject = remote;
  pc.ontrack = (event) => remote.addTrack(event.track);
  pc.onconnectionstatechange = () => log(`webrtc ${pc.connectionState}`);
  if ("requestVideoFrameCallback" in HTMLVideoElement.prototype) {
    ui.video.requestVideoFrameCallback(() => {
      ui.ttff.textContent = `${Math.round(performance.now() - startedAt)} ms`;
    });
  }
  await pc.setLocalDescription(await pc.createOffer());
  await waitForIceGathering(pc);
  send({ type: "webrtc.offer", sdp: pc.localDescription.sdp });
  ui.video.play().catch(() => { ui.unmute.hidden = false; });
}

async function onMessage(event) {
  let message;
  try { message = JSON.parse(event.data); } catch { return; }
  switch (message.type) {
    case "session.ready":
      log(`session ${message.session_id}: ${message.width}x${message.height} @ ${message.fps} fps (${message.engine})`);
      await startWebRTC();
      break;
    case "webrtc.answer":
      await pc.setRemoteDescription({ type: "answer", sdp: message.sdp });
      break;
    case "state":
      ui.state.textContent = message.state;
      break;
    case "stats":
      ui.buffer.textContent = `${message.buffer_ms} ms`;
      ui.underruns.textContent = String(message.underruns);
      ui.rtf.textContent = message.rtf == null ? "–" : message.rtf.toFixed(2);
      break;
    case "error":
      log(`error ${message.code}: ${message.message}`, "error");
      break;
    case "speak.started":
    case "speak.ended":
    case "interrupted":
      log(`${message.type} ${message.utterance_id ?? ""} ${message.played_ms ?? ""}`.trim());
      break;
    default:
      log(message.type);
  }
}

async function pollStats() {
  if (!pc) return;
  const report = await pc.getStats();
  report.forEach((s) => {
    if (s.type !== "inbound-rtp" || s.kind !== "video") return;
    if (s.framesPerSecond != null) {
      ui.fps.textContent = s.framesPerSecond.toFixed(1);
    } else if (lastInbound && s.framesDecoded != null) {
      const seconds = (s.timestamp - lastInbound.timestamp) / 1000;
      ui.fps.textContent = ((s.framesDecoded - lastInbound.framesDecoded) / seconds).toFixed(1);
    }
    if (lastInbound && s.jitterBufferEmittedCount > lastInbound.jitterBufferEmittedCount) {
      const delay = (s.jitterBufferDelay - lastInbound.jitterBufferDelay)
        / (s.jitterBufferEmittedCount - lastInbound.jitterBufferEmittedCount);
      ui.jitter.textContent = `${Math.round(delay * 1000)} ms`;
    }
    lastInbound = s;
  });
}

async function start(event) {
  event.preventDefault();
  const file = ui.image.files[0];
  if (!file) { log("choose a reference image first", "error"); return; }
  setRunning(true);
  startedAt = performance.now();
  let image;
  try { image = await imageAsBase64(file); } catch (err) {
    log(`cannot read the image: ${err}`, "error"); setRunning(false); return;
  }
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  ws = new WebSocket(`${scheme}://${location.host}/ws`);
  ws.onopen = () => send({ type: "session.start", image, prompt: ui.prompt.value });
  ws.onmessage = (e) => { onMessage(e).catch((err) => log(String(err), "error")); };
  ws.onclose = (e) => { log(`connection closed (${e.code})`); stop(); };
  statsTimer = setInterval(() => { pollStats().catch(() => {}); }, 1000);
}

function stop() {
  clearInterval(statsTimer);
  statsTimer = null;
  if (micStream) { micStream.getTracks().forEach((t) => t.stop()); micStream = null; }
  if (pc) { pc.close(); pc = null; }
  if (ws && ws.readyState <= WebSocket.OPEN) ws.close();
  ws = null;
  lastInbound = null;
  ui.mic.setAttribute("aria-pressed", "false");
  ui.mic.textContent = "Microphone off";
  setRunning(false);
}

function speak(event) {
  event.preventDefault();
  const text = ui.text.value.trim();
  if (!text) return;
  const utteranceId = `u${++utteranceCount}`;
  const message = { type: "speak", utterance_id: utteranceId, text };
  if (ui.language.value) message.language = ui.language.value;
  send(message);
  send({ type: "speak.end", utterance_id: utteranceId });
  ui.text.value = "";
}

async function toggleMic() {
  if (!micSender) return;
  if (micStream) {
    await micSender.replaceTrack(null);
    micStream.getTracks().forEach((t) => t.stop());
    micStream = null;
    ui.mic.setAttribute("aria-pressed", "false");
    ui.mic.textContent = "Microphone off";
    return;
  }
  try {
    micStream = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: true, noiseSuppression: true } });
  } catch (err) {
    log(`microphone: ${err.message}`, "error");
    return;
  }
  await micSender.replaceTrack(micStream.getAudioTracks()[0]);
  ui.mic.setAttribute("aria-pressed", "true");
  ui.mic.textContent = "Microphone on";
}

ui.image.addEventListener("change", () => {
  const file = ui.image.files[0];
  ui.preview.hidden = !file;
  if (file) ui.preview.src = URL.createObjectURL(file);
});
$("start-form").addEventListener("submit", (e) => { start(e).catch((err) => log(String(err), "error")); });
ui.stop.addEventListener("click", stop);
$("speak-form").addEventListener("submit", speak);
ui.interrupt.addEventListener("click", () => send({ type: "interrupt" }));
ui.mic.addEventListener("click", () => { toggleMic().catch((err) => log(String(err), "error")); });
ui.unmute.addEventListener("click", () => { ui.video.play(); ui.unmute.hidden = true; });
setRunning(false);
