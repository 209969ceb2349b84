// Browser client of avatar-server (no build step). Protocol: docs/PROTOCOL.md.
//
// session.start over the WebSocket (with the chosen mode and barge-in), then one
// RTCPeerConnection: video recvonly; audio recvonly in the Text mode, or sendrecv carrying the
// microphone in the two microphone modes (lipsync, conversation). The microphone button mutes
// it with replaceTrack, so toggling needs no renegotiation; switching between the microphone
// modes and toggling barge-in while running send session.update. ICE is not trickled: the
// offer is sent once gathering completes. Server recording: record.start / record.stop.
// Resume: when the WebSocket drops (any close but 1000/1001) the page reconnects within the
// session's resume_grace_s and sends session.resume with the last resume_token, keeping its
// peer connection (a new offer only if that one failed or closed). The resume WebSocket is
// /ws?session_id=<id>: a fleet's request router sends it to the replica that holds the session
// (a browser cannot set the X-Session-Id header on a WebSocket); a single server ignores it.
//
// For tests and debugging the page exposes `window.avatarEvents` (every server message, in
// order of arrival), `window.avatarSent` (every message sent, with session.start's image
// replaced by its length) and `window.avatar` (`pc`, the peer connection, and `figures`, the
// last figures shown in the overlay, and `dropConnection()`, which closes the WebSocket with code
// 4000 as a network drop would end it abnormally, to exercise the resume path).

const $ = (id) => document.getElementById(id);

const MAX_SIDE_PX = 2048;          // larger pictures are scaled down before upload
const MAX_UPLOAD_BYTES = 6 << 20;  // below the server's default max_image_bytes (8 MiB)
const MAX_CHUNK_CHARS = 1000;      // below the server's default max_text_chars (2000)
const STATS_INTERVAL_MS = 1000;
const MIC_CONSTRAINTS = { echoCancellation: true, noiseSuppression: true };
const RECORD_REASONS = {
  session_ended: "the session ended", max_duration: "its maximum duration was reached",
  max_size: "its maximum size was reached", disk_full: "the server's disk is full", failed: "writing failed",
};

const ui = {
  video: $("video"), placeholder: $("placeholder"), overlay: $("overlay"), unmute: $("unmute"),
  notice: $("notice"),
  image: $("image"), preview: $("preview"), prompt: $("prompt"), start: $("start"), stop: $("stop"),
  speakFields: $("speak-fields"), text: $("text"), language: $("language"), interrupt: $("interrupt"),
  mic: $("mic"), log: $("log"), error: $("error"), errorText: $("error-text"),
  fps: $("stat-fps"), decoded: $("stat-decoded"), dropped: $("stat-dropped"), jitter: $("stat-jitter"),
  level: $("stat-level"), levelBar: $("stat-level-bar"), figuresToggle: $("figures"), audio: $("stat-audio"), ttff: $("stat-ttff"),
  state: $("stat-state"), serverStats: $("server-stats"),
  mode: $("mode"), bargeIn: $("barge-in"), stateLine: $("state"), recBadge: $("rec-badge"),
  recordFields: $("record-fields"), record: $("record"), recordStatus: $("record-status"),
};

const STATE_LABELS = {
  idle: "idle", speaking: "speaking", listening: "listening",
  connecting: "connecting…", disconnected: "not connected", ended: "session ended",
  reconnecting: "reconnecting…",
};

let ws = null;
let pc = null;
let micSender = null;
let micStream = null;
let statsTimer = null;
let startedAt = 0;
let utteranceCount = 0;
let running = false;
let sessionReady = false;
let sessionMode = "text";    // the mode the running session was started with (text, lipsync, conversation)
let recording = null;        // {id, path} while the server records
let recordPending = false;   // record.start / record.stop sent, no answer yet
let recordStopAsked = false; // this page sent record.stop for the running recording
let previous = {};  // last inbound-rtp report per kind, for rates
let resumeToken = null;      // secret of session.ready / the last session.resumed
let resumeSessionId = null;  // session_id of session.ready / session.resumed: routes the resume
let resumeGraceMs = 0;       // how long the server keeps a session whose WebSocket dropped
let resumeDeadline = 0;      // performance.now() after which a resume is pointless
let resuming = false;        // reconnecting: session.resume not yet answered
let resumeAttempt = 0;       // index into RESUME_RETRY_MS
const RESUME_RETRY_MS = [0, 250, 500, 1000, 2000];

const events = [];
const sent = [];
const figures = {};
window.avatarEvents = events;
window.avatarSent = sent;
window.avatar = {
  get pc() { return pc; },
  figures,
  dropConnection() { if (ws) ws.close(4000, "dropped by the page (test)"); },
};

// ------------------------------------------------------------------------------- helpers
function log(text, cls) {
  const item = document.createElement("li");
  item.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  if (cls) item.className = cls;
  ui.log.prepend(item);
  while (ui.log.children.length > 200) ui.log.lastChild.remove();
}

function showError(text) {
  ui.errorText.textContent = text;
  ui.error.hidden = false;
  log(text, "error");
}

function clearError() {
  ui.error.hidden = true;
  ui.errorText.textContent = "";
}

function updateControls() {
  ui.start.disabled = running || ui.image.files.length === 0;
  ui.stop.disabled = !running;
  ui.image.disabled = running;
  ui.speakFields.disabled = !running;
  // Text <-> microphone needs another peer connection: fixed while a session runs. The two
  // microphone modes switch live (session.update).
  const micSession = running && sessionMode !== "text";
  ui.mode.disabled = running && !micSession;
  for (const option of ui.mode.options) option.disabled = micSession && option.value === "text";
  ui.bargeIn.disabled = ui.mode.value === "text";
  ui.mic.hidden = !micSession;
  ui.recordFields.disabled = !sessionReady;
  ui.record.disabled = recordPending;
}

function setState(state) {
  ui.stateLine.dataset.state = state;
  ui.stateLine.textContent = STATE_LABELS[state] ?? state;
  if (["idle", "speaking", "listening"].includes(state)) ui.state.textContent = state;
}

function send(message) {
  if (!ws || ws.readyState !== WebSocket.OPEN) return false;
  ws.send(JSON.stringify(message));
  sent.push(message.type === "session.start" ? { ...message, image: `<${message.image.length} base64 characters>` } : message);
  return true;
}

function setFigure(el, key, value, text) {
  figures[key] = value;
  el.textContent = text;
}

// ------------------------------------------------------------------------------- server stats
// Every numeric field of a `stats` message is shown; the unit comes from the name's suffix.
const SERVER_LABELS = {
  buffer_ms: "buffer depth",
  underruns: "underruns",
  segments: "segments",
  frames_sent: "frames sent",
  frames_dropped: "frames dropped (server)",
  rtf: "real-time factor",
  ttff_ms: "first frame (server)",
  gen_ms: "segment generation",
  segment_generation_ms: "segment generation",
  encode_ms: "encode",
  queue: "queue",
  queue_length: "queue",
  interrupt_ms: "interrupt → silence",
  interrupt_to_silence_ms: "interrupt → silence",
  av_offset_ms: "A/V offset",
  upgraded: "segments upgraded",
};
// Not shown as figures: the state has its own row, the size is shown as one "resolution" row.
const SKIPPED_FIELDS = new Set(["type", "state", "width", "height"]);

function serverRow(name, label) {
  let dd = ui.serverStats.querySelector(`dd[data-field="${name}"]`);
  if (!dd) {
    const row = document.createElement("div");
    const dt = document.createElement("dt");
    dt.textContent = label;
    dd = document.createElement("dd");
    dd.dataset.field = name;
    row.append(dt, dd);
    ui.serverStats.append(row);
  }
  return dd;
}

function serverLabel(name) {
  if (name in SERVER_LABELS) return SERVER_LABELS[name];
  return name.replace(/_(ms|s|hz|bytes|pct|percent|ratio)$/, "").replaceAll("_", " ");
}

function formatServerValue(name, value) {
  if (value == null) return "–";
  if (name === "rtf" || name.endsWith("_ratio") || name.endsWith("_rtf")) return `${value.toFixed(2)}×`;
  if (name.endsWith("_ms")) return `${Math.round(value)} ms`;
  if (name.endsWith("_s")) return `${value.toFixed(2)} s`;
  if (name.endsWith("_hz")) return `${Math.round(value)} Hz`;
  if (name.endsWith("_bytes")) return value >= 1 << 20 ? `${(value / (1 << 20)).toFixed(1)} MiB` : `${Math.round(value / 1024)} KiB`;
  if (name.endsWith("_pct") || name.endsWith("_percent")) return `${value.toFixed(1)} %`;
  return Number.isInteger(value) ? String(value) : value.toFixed(2);
}

function showServerStats(message) {
  for (const [name, value] of Object.entries(message)) {
    if (SKIPPED_FIELDS.has(name) || (value !== null && typeof value !== "number")) continue;
    serverRow(name, serverLabel(name)).textContent = formatServerValue(name, value);
    figures[`server_${name}`] = value;
  }
  if (typeof message.width === "number" && typeof message.height === "number") {
    serverRow("resolution", "resolution").textContent = `${message.width}×${message.height}`;
  }
  if (message.state) setState(message.state);
}

// ------------------------------------------------------------------------------- client stats
async function pollStats() {
  if (!pc) return;
  const report = await pc.getStats();
  report.forEach((s) => {
    if (s.type !== "inbound-rtp") return;
    const last = previous[s.kind];
    const seconds = last ? (s.timestamp - last.timestamp) / 1000 : 0;
    if (s.kind === "video") {
      const fps = s.framesPerSecond ?? (seconds > 0 ? (s.framesDecoded - last.framesDecoded) / seconds : null);
      if (fps != null) setFigure(ui.fps, "fps", fps, fps.toFixed(1));
      setFigure(ui.decoded, "framesDecoded", s.framesDecoded ?? 0, String(s.framesDecoded ?? 0));
      setFigure(ui.dropped, "framesDropped", s.framesDropped ?? 0, String(s.framesDropped ?? 0));
      if (last && s.jitterBufferEmittedCount > last.jitterBufferEmittedCount) {
        const delayMs = 1000 * (s.jitterBufferDelay - last.jitterBufferDelay)
          / (s.jitterBufferEmittedCount - last.jitterBufferEmittedCount);
        setFigure(ui.jitter, "jitterBufferMs", delayMs, `${Math.round(delayMs)} ms`);
      }
    } else if (s.kind === "audio") {
      if (s.audioLevel != null) {
        const dbfs = s.audioLevel > 0 ? 20 * Math.log10(s.audioLevel) : -Infinity;
        // bar: -60 dBFS (empty) to 0 dBFS (full)
        ui.levelBar.style.width = `${Math.max(0, Math.min(100, (dbfs + 60) * 100 / 60))}%`;
        setFigure(ui.level, "audioLevel", s.audioLevel, Number.isFinite(dbfs) ? `${dbfs.toFixed(0)} dBFS` : "silent");
      }
      const receivedS = (s.totalSamplesReceived ?? 0) / 48000;
      setFigure(ui.audio, "audioReceivedS", receivedS, `${receivedS.toFixed(1)} s`);
    }
    previous[s.kind] = s;
  });
}

// ------------------------------------------------------------------------------- WebRTC
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

function onFirstFrame() {
  const ms = performance.now() - startedAt;
  ui.placeholder.hidden = true;
  setFigure(ui.ttff, "ttffMs", ms, `${Math.round(ms)} ms`);
}

async function startWebRTC(iceServers) {
  pc = new RTCPeerConnection({ iceServers });
  const peer = pc;
  peer.addTransceiver("video", { direction: "recvonly" });
  if (micStream) {
    // Microphone modes: the offer's audio section is sendrecv and carries the microphone.
    micSender = peer.addTransceiver(micStream.getAudioTracks()[0], { direction: "sendrecv", streams: [micStream] }).sender;
    setMicButton(true);
  } else {
    peer.addTransceiver("audio", { direction: "recvonly" });
  }
  const remote = new MediaStream();
  ui.video.srcObject = remote;
  peer.ontrack = (event) => remote.addTrack(event.track);
  peer.onconnectionstatechange = () => {
    log(`webrtc ${peer.connectionState}`);
    if (peer.connectionState === "failed") {
      showError("The media connection failed (no usable ICE candidate pair). Check that the server is reachable, or configure a TURN server.");
    }
  };
  if ("requestVideoFrameCallback" in HTMLVideoElement.prototype) {
    ui.video.requestVideoFrameCallback(onFirstFrame);
  } else {
    ui.video.addEventListener("loadeddata", onFirstFrame, { once: true });
  }
  await peer.setLocalDescription(await peer.createOffer());
  await waitForIceGathering(peer);
  if (pc !== peer) return; // stopped meanwhile
  send({ type: "webrtc.offer", sdp: peer.localDescription.sdp });
  ui.video.play().catch(() => { ui.unmute.hidden = false; });
}

// ------------------------------------------------------------------------------- messages
async function onMessage(event) {
  let message;
  try { message = JSON.parse(event.data); } catch (err) {
    showError(`The server sent a message that is not JSON (${err.message}): ${String(event.data).slice(0, 200)}`);
    return;
  }
  events.push(message);
  switch (message.type) {
    case "session.ready": {
      sessionReady = true;
      rememberResume(message);
      const micText = sessionMode === "text" ? "text" : `microphone, ${message.mode}`;
      log(`session ${message.session_id}: ${message.width}×${message.height} at ${message.fps} fps (${message.engine}; ${micText}; barge-in ${message.barge_in ? "on" : "off"})`);
      setState("idle");
      showNotice(message.notice);
      syncSessionOptions(message);
      updateControls();
      await startWebRTC(Array.isArray(message.ice_servers) ? message.ice_servers : []);
      break;
    }
    case "session.resumed": {
      resuming = false;
      rememberResume(message);
      log(`resumed session ${message.session_id} (${message.missed_messages} missed messages follow`
        + `${message.dropped_messages ? `, ${message.dropped_messages} lost` : ""}; peer connection `
        + `${message.peer_connection ?? "none"})`);
      setState("idle");
      updateControls();
      if (!pc || ["failed", "closed"].includes(message.peer_connection) || message.peer_connection === null) {
        if (pc) { pc.close(); pc = null; }
        await startWebRTC(Array.isArray(message.ice_servers) ? message.ice_servers : []);
      }
      break;
    }
    case "webrtc.answer":
      if (pc) await pc.setRemoteDescription({ type: "answer", sdp: message.sdp });
      break;
    case "state":
      setState(message.state);
      break;
    case "stats":
      showServerStats(message);
      break;
    case "record.started":
      onRecordStarted(message);
      break;
    case "record.stopped":
      onRecordStopped(message);
      break;
    case "error":
      showError(`Error ${message.code}${message.field ? ` (${message.field})` : ""}: ${message.message}`);
      if (recordPending) { recordPending = false; updateControls(); }
      if (message.code === "resume_failed") {
        resuming = false;
        showError("The connection dropped and the session could not be resumed (it has ended). Press Start for a new one.");
        stop();
      } else if (!sessionReady) stop(); // session.start was refused: nothing runs
      break;
    case "session.ended":
      showError(`The server ended the session (${message.reason})${message.message ? `: ${message.message}` : "."}`);
      setState("ended");
      break;
    case "speak.started":
    case "speak.ended":
    case "interrupted": {
      const played = message.played_ms ? ` after ${message.played_ms} ms` : "";
      log(`${message.type} ${message.utterance_id ?? "(nothing pending)"}${played}`);
      break;
    }
    default:
      log(message.type);
  }
}

// ------------------------------------------------------------------------------- actions
async function start(event) {
  event.preventDefault();
  const file = ui.image.files[0];
  if (!file) { showError("Choose a reference image first."); return; }
  clearError();
  sessionMode = ui.mode.value;
  running = true;
  updateControls();
  setState("connecting");
  startedAt = performance.now();
  events.length = 0;
  sent.length = 0;
  let image;
  try { image = await imageAsBase64(file); } catch (err) {
    showError(`Cannot read the image: ${err}`);
    stop();
    return;
  }
  if (sessionMode !== "text") {
    // Ask for the microphone before the session starts: a refusal costs no session.
    try {
      micStream = await navigator.mediaDevices.getUserMedia({ audio: MIC_CONSTRAINTS });
    } catch (err) {
      showError(`Microphone: ${err.message || err.name}. Allow the microphone, or choose the Text mode.`);
      stop();
      return;
    }
    if (!running) { stop(); return; } // stopped meanwhile
  }
  connectSocket(sessionStartMessage(image));
  statsTimer = setInterval(() => { pollStats().catch(() => {}); }, STATS_INTERVAL_MS);
  ui.figuresToggle.hidden = false;
  showFigures(ui.figuresToggle.getAttribute("aria-pressed") === "true");
  ui.text.focus();
}

// Open the WebSocket and send `first` (session.start or session.resume) once it is open.
// `sessionId` (on resume) names the session in the query, so that a fleet routes the
// WebSocket to the replica that holds it (ops/deploy/README.md).
function connectSocket(first, sessionId = null) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const params = new URLSearchParams();
  // A session token given to the page (`/?token=...`) is passed on to /ws.
  const token = new URLSearchParams(location.search).get("token");
  if (token) params.set("token", token);
  if (sessionId) params.set("session_id", sessionId);
  const query = params.toString() ? `?${params}` : "";
  const socket = new WebSocket(`${scheme}://${location.host}/ws${query}`);
  ws = socket;
  socket.onopen = () => send(first);
  socket.onmessage = (e) => { onMessage(e).catch((err) => showError(String(err))); };
  socket.onclose = (e) => {
    if (ws !== socket) return;
    log(`connection closed (${e.code}${e.reason ? `: ${e.reason}` : ""})`);
    const ended = events.some((m) => m.type === "session.ended");
    if (!ended && running && sessionReady && resumeToken && e.code !== 1000 && e.code !== 1001) {
      if (!resuming) {
        resuming = true;
        resumeAttempt = 0;
        resumeDeadline = performance.now() + resumeGraceMs;
        setState("reconnecting");
        log("connection lost: resuming the session");
      } else {
        resumeAttempt += 1; // this reconnection attempt failed too
      }
      resumeLater();
      return;
    }
    if (ended) {
      // already shown
    } else if (e.code === 1006 && !sessionReady) {
      showError("Cannot open the connection to the server (refused or unreachable). A server with an API key "
        + "needs a session token: open this page as /?token=<session token>.");
    } else if (e.code !== 1000) {
      showError(`The server closed the connection (code ${e.code}${e.reason ? `: ${e.reason}` : ""}).`);
    }
    stop();
  };
}

function rememberResume(message) {
  resumeToken = message.resume_token || null;
  resumeSessionId = message.session_id || null;
  resumeGraceMs = (message.resume_grace_s || 0) * 1000;
}

// Reconnect after a drop (attempt `resumeAttempt`), until the grace period is over.
function resumeLater() {
  const delay = RESUME_RETRY_MS[Math.min(resumeAttempt, RESUME_RETRY_MS.length - 1)];
  setTimeout(() => {
    if (!running) return; // stopped meanwhile
    if (performance.now() >= resumeDeadline) {
      resuming = false;
      showError("The connection dropped and could not be restored within the session's resume time; the session has ended.");
      stop();
      return;
    }
    connectSocket({ type: "session.resume", resume_token: resumeToken }, resumeSessionId);
  }, delay);
}

function sessionStartMessage(image) {
  const message = { type: "session.start", image, prompt: ui.prompt.value, barge_in: bargeInWanted() };
  if (sessionMode !== "text") message.mode = sessionMode;
  return message;
}

function bargeInWanted() {
  return ui.mode.value !== "text" && ui.bargeIn.checked;
}

// What the engine's picture is when it is not a real person (session.ready.notice): the preview
// engine's untrained weights make noise by design, and the page says so rather than leave a new
// user looking at coloured noise.
function showNotice(text) {
  ui.notice.textContent = typeof text === "string" ? text : "";
  ui.notice.hidden = !ui.notice.textContent;
}

// Options changed between Start and session.ready go out as a session.update.
function syncSessionOptions(ready) {
  const update = {};
  if (sessionMode !== "text" && ready.mode && ready.mode !== sessionMode) update.mode = sessionMode;
  if (typeof ready.barge_in === "boolean" && ready.barge_in !== bargeInWanted()) update.barge_in = bargeInWanted();
  if (Object.keys(update).length) send({ type: "session.update", ...update });
}

function changeMode() {
  if (running && sessionMode !== "text" && ui.mode.value !== "text" && ui.mode.value !== sessionMode) {
    sessionMode = ui.mode.value;
    if (sessionReady) {
      send({ type: "session.update", mode: sessionMode });
      log(`mode ${sessionMode}`);
    }
  }
  updateControls();
}

function changeBargeIn() {
  if (running && sessionReady) {
    send({ type: "session.update", barge_in: bargeInWanted() });
    log(`barge-in ${bargeInWanted() ? "on" : "off"}`);
  }
}

// ------------------------------------------------------------------------------- recording
function toggleRecording() {
  if (!sessionReady || recordPending) return;
  recordPending = true;
  if (recording) {
    recordStopAsked = true;
    send({ type: "record.stop" });
    ui.recordStatus.textContent = `Finishing ${recording.id}…`;
  } else {
    send({ type: "record.start" });
    ui.recordStatus.textContent = "Starting…";
  }
  ui.recordStatus.classList.remove("warn");
  updateControls();
}

function setRecordButton(on) {
  ui.record.setAttribute("aria-pressed", String(on));
  ui.record.textContent = on ? "Stop recording" : "Record";
  ui.recBadge.hidden = !on;
}

function onRecordStarted(message) {
  recording = { id: message.recording_id, path: message.path };
  recordPending = false;
  recordStopAsked = false;
  setRecordButton(true);
  ui.recordStatus.textContent = `Recording ${message.recording_id} to ${message.path}`;
  log(`record.started ${message.recording_id}`);
  updateControls();
}

function onRecordStopped(message) {
  const asked = recordStopAsked;
  recording = null;
  recordPending = false;
  recordStopAsked = false;
  setRecordButton(false);
  const seconds = (Number(message.duration_ms) / 1000).toFixed(1);
  let text = `Recorded ${message.recording_id}: ${seconds} s`;
  if (typeof message.size_bytes === "number" && message.size_bytes > 0) text += `, ${formatServerValue("size_bytes", message.size_bytes)}`;
  text += `, ${message.path}`;
  if (message.dropped_frames) text += `; ${message.dropped_frames} frames repeated (the writer fell behind)`;
  // `reason` (stopped = record.stop) and `message` are newer fields: shown when present.
  const serverStopped = message.reason ? message.reason !== "stopped" : !asked;
  let why = "";
  if (serverStopped) {
    why = `the server stopped it: ${RECORD_REASONS[message.reason] ?? message.reason ?? "no reason given"}`;
    if (message.message) why += ` (${message.message})`;
    text += `; ${why}`;
  }
  ui.recordStatus.textContent = text;
  ui.recordStatus.classList.toggle("warn", Boolean(message.error) || serverStopped);
  log(`record.stopped ${message.recording_id}: ${seconds} s${message.reason ? ` (${message.reason})` : ""}`);
  if (message.error) {
    showError(`Recording ${message.recording_id} failed: ${message.error}`);
  } else if (serverStopped) {
    log(`recording ${message.recording_id}: ${why}`, "error");
  }
  updateControls();
}

function stop() {
  clearInterval(statsTimer);
  statsTimer = null;
  if (micStream) { micStream.getTracks().forEach((t) => t.stop()); micStream = null; }
  if (pc) { pc.close(); pc = null; }
  const socket = ws;
  ws = null;
  if (socket && socket.readyState <= WebSocket.OPEN) socket.close(1000);
  micSender = null;
  previous = {};
  ui.video.srcObject = null;
  ui.placeholder.hidden = false;
  ui.overlay.hidden = true;
  ui.figuresToggle.hidden = true;
  setMicButton(false);
  if (recording) {
    ui.recordStatus.textContent = `Recording ${recording.id} is finished by the server as the session ends: ${recording.path}`;
  }
  recording = null;
  recordPending = false;
  setRecordButton(false);
  running = false;
  sessionReady = false;
  resuming = false;
  resumeToken = null;
  resumeSessionId = null;
  setState(events.some((m) => m.type === "session.ended") ? "ended" : "disconnected");
  updateControls();
}

function showFigures(show) {
  ui.overlay.hidden = !show;
  ui.figuresToggle.setAttribute("aria-pressed", String(show));
}

function splitText(text) {
  const chunks = [];
  let rest = text;
  while (rest.length > MAX_CHUNK_CHARS) {
    let cut = rest.lastIndexOf(" ", MAX_CHUNK_CHARS);
    if (cut <= 0) cut = MAX_CHUNK_CHARS;
    chunks.push(rest.slice(0, cut));
    rest = rest.slice(cut);
  }
  chunks.push(rest);
  return chunks;
}

function speak(event) {
  event.preventDefault();
  const text = ui.text.value.trim();
  if (!text || !running) return;
  const utteranceId = `u${++utteranceCount}`;
  for (const chunk of splitText(text)) {
    const message = { type: "speak", utterance_id: utteranceId, text: chunk };
    if (ui.language.value) message.language = ui.language.value;
    send(message);
  }
  send({ type: "speak.end", utterance_id: utteranceId });
  log(`speak ${utteranceId} (${text.length} characters${ui.language.value ? `, ${ui.language.value}` : ""})`);
  ui.text.value = "";
}

function interrupt() {
  if (!running) return;
  send({ type: "interrupt" });
  log("interrupt");
}

function setMicButton(on) {
  ui.mic.setAttribute("aria-pressed", String(on));
  ui.mic.textContent = on ? "Microphone on" : "Microphone off";
}

// Microphone modes only: mute (the track is stopped and detached) and unmute.
async function toggleMic() {
  if (!micSender) return;
  if (micStream) {
    await micSender.replaceTrack(null);
    micStream.getTracks().forEach((t) => t.stop());
    micStream = null;
    setMicButton(false);
    return;
  }
  try {
    micStream = await navigator.mediaDevices.getUserMedia({ audio: MIC_CONSTRAINTS });
  } catch (err) {
    showError(`Microphone: ${err.message || err.name}`);
    return;
  }
  if (!micSender) { micStream.getTracks().forEach((t) => t.stop()); micStream = null; return; }
  await micSender.replaceTrack(micStream.getAudioTracks()[0]);
  setMicButton(true);
}

// ------------------------------------------------------------------------------- wiring
ui.image.addEventListener("change", () => {
  const file = ui.image.files[0];
  ui.preview.hidden = !file;
  if (file) ui.preview.src = URL.createObjectURL(file);
  updateControls();
});
$("start-form").addEventListener("submit", (e) => { start(e).catch((err) => showError(String(err))); });
ui.stop.addEventListener("click", stop);
$("speak-form").addEventListener("submit", speak);
ui.text.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); $("speak-form").requestSubmit(); }
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && running && e.target.tagName !== "SELECT") interrupt();
});
ui.interrupt.addEventListener("click", interrupt);
ui.mic.addEventListener("click", () => { toggleMic().catch((err) => showError(String(err))); });
ui.mode.addEventListener("change", changeMode);
ui.bargeIn.addEventListener("change", changeBargeIn);
ui.record.addEventListener("click", toggleRecording);
ui.unmute.addEventListener("click", () => { ui.video.play(); ui.unmute.hidden = true; });
$("error-close").addEventListener("click", clearError);
ui.figuresToggle.addEventListener("click", () => showFigures(ui.overlay.hidden));
updateControls();
setState("disconnected");
