// diffstream browser client: create a session, watch it over WebRTC, talk to it over a websocket.
// Plain ES module, no build step. Query parameters:
//   ?autostart=1&audio=URL  start with the default reference and stream that audio file
//   &loop=1                 repeat the audio file
//   ?session=ID             watch a session a program created (the program sends the audio)
//   &token=T                bearer token when the server requires one

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

// Everything a test or an embedding page may want to read.
const state = (window.diffstream = {
  status: "idle",
  sessionId: null,
  error: null,
  stats: null,
  statsHistory: [],
  presentedFrames: 0,
  renderFps: 0,
  audioSentSeconds: 0,
  audioDone: false,
});

let pc = null;
let ws = null;
let session = null;
let selectedRef = "default";
let uploadedImage = null;
let audioCtx = null;
let micStream = null;
let micNode = null;
let fileSender = null;

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
  if (isError) state.error = text;
}

function authHeaders() {
  const token = $("token").value || params.get("token");
  return token ? { Authorization: `Bearer ${token}` } : {};
}

// The token goes to this server only, never to another origin an ?audio= URL may point at.
function headersFor(url) {
  return new URL(url, location.href).origin === location.origin ? authHeaders() : {};
}

async function api(method, path, body, headers = {}) {
  const res = await fetch(path, { method, body, headers: { ...authHeaders(), ...headers } });
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (!res.ok) {
    const detail = data && data.detail ? data.detail : text || res.statusText;
    const err = new Error(`${res.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
    err.status = res.status;
    throw err;
  }
  return data;
}

// ---- reference images -------------------------------------------------------------------------

// An image of this server: fetched with the token (an <img src> cannot send one).
async function showImage(img, url) {
  try {
    const res = await fetch(url, { headers: headersFor(url) });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    img.src = URL.createObjectURL(await res.blob());
  } catch {
    img.alt = `${img.alt} (not loaded)`;
  }
}

let referencesShown = false;

// Every /v1 route wants the token when the server has one, /v1/config included: a 401 here
// means "ask for the token", and entering it runs this again.
async function loadReferences() {
  try {
    const config = await api("GET", "/v1/config");
    $("token-row").hidden = !config.auth_required || Boolean(params.get("token"));
    if (state.error && state.error.startsWith("this server needs a token")) {
      state.error = null;
      setStatus("");
    }
    if (referencesShown) return;
    referencesShown = true;
    for (const img of document.querySelectorAll("#references img[data-src]")) {
      showImage(img, img.dataset.src);
    }
    const refs = await api("GET", "/v1/references");
    for (const ref of refs) {
      const label = document.createElement("label");
      label.className = "ref";
      label.dataset.ref = ref.url;
      label.title = ref.name;
      const img = document.createElement("img");
      img.alt = ref.name;
      showImage(img, ref.url);
      label.appendChild(img);
      $("references").appendChild(label);
    }
  } catch (err) {
    if (err.status === 401) {
      $("token-row").hidden = false;
      setStatus("this server needs a token: enter it under the images", true);
    } else {
      setStatus(`cannot reach the server: ${err.message}`, true);
    }
  }
}

function wireReferences() {
  $("references").addEventListener("click", (ev) => {
    const label = ev.target.closest(".ref");
    if (!label) return;
    for (const el of document.querySelectorAll(".ref")) el.classList.remove("selected");
    label.classList.add("selected");
    selectedRef = label.dataset.ref;
    uploadedImage = null;
    showReferenceWarning(null);
  });
  $("image").addEventListener("change", () => {
    uploadedImage = $("image").files[0] || null;
    showReferenceWarning(null);
    if (uploadedImage) {
      for (const el of document.querySelectorAll(".ref")) el.classList.remove("selected");
      setStatus(`reference: ${uploadedImage.name}`);
    }
  });
}

// The server's word on the reference: null when the model knows this kind of image, else a
// sentence (e.g. a photograph given to the default model, which only knows drawn faces).
function showReferenceWarning(text) {
  const el = $("reference-warning");
  el.textContent = text ? `⚠ ${text}. The session runs anyway.` : "";
  el.hidden = !text;
}

async function referenceBlob() {
  if (uploadedImage) return uploadedImage;
  if (selectedRef === "default") return null;
  const res = await fetch(selectedRef, { headers: headersFor(selectedRef) });
  return res.ok ? await res.blob() : null;
}

// ---- session and WebRTC -----------------------------------------------------------------------

async function connect() {
  $("connect").disabled = true;
  state.status = "connecting";
  state.error = null;
  setStatus("creating session…");
  try {
    const watchOnly = params.get("session");
    if (watchOnly) {
      session = await api("GET", `/v1/sessions/${encodeURIComponent(watchOnly)}`);
    } else {
      const form = new FormData();
      const image = await referenceBlob();
      if (image) form.append("image", image, image.name || "reference.png");
      session = await api("POST", "/v1/sessions", form);
      showReferenceWarning(session.reference_warning);
    }
    state.sessionId = session.session_id;
    setStatus("connecting video…");

    pc = new RTCPeerConnection({ iceServers: session.ice_servers });
    pc.addTransceiver("video", { direction: "recvonly" });
    pc.addTransceiver("audio", { direction: "recvonly" });
    const channel = pc.createDataChannel("stats");
    channel.onmessage = (ev) => showStats(JSON.parse(ev.data));
    pc.ontrack = (ev) => {
      const video = $("avatar");
      if (!video.srcObject) video.srcObject = new MediaStream();
      video.srcObject.addTrack(ev.track);
      playVideo();
    };
    pc.onconnectionstatechange = () => {
      if (pc && ["failed", "closed"].includes(pc.connectionState)) {
        setStatus(`connection ${pc.connectionState}`, pc.connectionState === "failed");
        disconnect(false);
      }
    };
    await pc.setLocalDescription(await pc.createOffer());
    await waitForIce(pc);
    const answer = await api(
      "POST",
      session.offer_url,
      JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer" }),
      { "Content-Type": "application/json" },
    );
    await pc.setRemoteDescription(answer);
    state.status = "connected";
    $("disconnect").disabled = false;
    if (watchOnly) {
      setStatus(`watching session ${watchOnly}; its audio comes from the program that created it`);
    } else {
      await openAudioSocket();
      setStatus("connected — talk with the microphone or play a file");
      for (const id of ["mic", "sample", "audio-file", "interrupt", "stop"]) $(id).disabled = false;
    }
    $("overlay").classList.add("hidden");
  } catch (err) {
    state.status = "error";
    setStatus(`could not connect: ${err.message}`, true);
    await disconnect(false);
  }
}

function waitForIce(peer) {
  // Non-trickle: the server answers one complete offer, so gather first (bounded wait).
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (peer.iceGatheringState === "complete") { clearTimeout(timer); resolve(); } };
    const timer = setTimeout(resolve, 3000);
    peer.addEventListener("icegatheringstatechange", done);
  });
}

function playVideo() {
  const video = $("avatar");
  video.play().catch(() => {
    // Autoplay with sound needs a user gesture in most browsers: start muted, offer unmute.
    video.muted = true;
    $("unmute").hidden = false;
    video.play().catch(() => {});
  });
}

function openAudioSocket() {
  return new Promise((resolve, reject) => {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const token = $("token").value || params.get("token");
    const query = token ? `?token=${encodeURIComponent(token)}` : "";
    ws = new WebSocket(`${proto}//${location.host}${session.audio_url}${query}`);
    ws.binaryType = "arraybuffer";
    ws.onopen = () => resolve();
    ws.onerror = () => reject(new Error("audio websocket failed"));
    ws.onmessage = (ev) => {
      const msg = JSON.parse(ev.data);
      if (msg.type === "error") setStatus(`server: ${msg.message}`, true);
    };
    ws.onclose = (ev) => {
      if (ev.code !== 1000 && ev.code !== 1005 && state.status === "connected") {
        setStatus(`audio socket closed (${ev.code}) ${ev.reason}`, ev.code >= 1002);
      }
      ws = null;
    };
  });
}

async function disconnect(deleteSession = true) {
  stopMic();
  if (fileSender) fileSender.cancel();
  if (ws) { try { ws.close(1000, "bye"); } catch {} ws = null; }
  if (pc) { const p = pc; pc = null; p.close(); }
  if (session && deleteSession && !params.get("session")) {
    try { await api("DELETE", `/v1/sessions/${session.session_id}`); } catch {}
  }
  session = null;
  state.status = state.status === "error" ? "error" : "idle";
  const video = $("avatar");
  video.srcObject = null;
  $("overlay").classList.remove("hidden");
  $("overlay").textContent = "Not connected";
  $("connect").disabled = false;
  for (const id of ["disconnect", "mic", "sample", "audio-file", "interrupt", "stop"]) $(id).disabled = true;
}

// ---- sending audio ----------------------------------------------------------------------------

const SEND_RATE = 16000;
const CHUNK_MS = 20;

function sendStart(sampleRate, format) {
  ws.send(JSON.stringify({ type: "start", sample_rate: sampleRate, channels: 1, format }));
}

function toS16(samples) {
  const out = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    out[i] = s < 0 ? s * 32768 : s * 32767;
  }
  return out;
}

async function decodeToMono(arrayBuffer) {
  // Decode with WebAudio, then render mono at SEND_RATE with an offline context (its resampler).
  // Offline contexts need no user gesture, so this also works for ?autostart=1.
  const decoded = await new OfflineAudioContext(1, 1, SEND_RATE).decodeAudioData(arrayBuffer);
  const frames = Math.ceil(decoded.duration * SEND_RATE);
  const offline = new OfflineAudioContext(1, frames, SEND_RATE);
  const src = offline.createBufferSource();
  src.buffer = decoded;
  src.connect(offline.destination);
  src.start();
  const rendered = await offline.startRendering();
  return rendered.getChannelData(0);
}

// Streams PCM in real time: chunk i is sent when its time has come (timers drift; the deadline
// is computed from the start so they never accumulate).
function streamPcm(samples, { loop = false } = {}) {
  if (fileSender) fileSender.cancel();
  const step = Math.round((SEND_RATE * CHUNK_MS) / 1000);
  let cancelled = false;
  let sent = 0;
  const start = performance.now();
  sendStart(SEND_RATE, "s16le");
  state.audioDone = false;
  const tick = () => {
    if (cancelled || !ws || ws.readyState !== WebSocket.OPEN) return;
    const due = ((performance.now() - start) / 1000) * SEND_RATE + step; // one chunk ahead
    while (sent < due) {
      if (!loop && sent >= samples.length) {
        state.audioDone = true;
        return;
      }
      const pos = sent % samples.length;
      const chunk = samples.subarray(pos, Math.min(pos + step, samples.length));
      ws.send(toS16(chunk).buffer);
      sent += chunk.length;
      state.audioSentSeconds = sent / SEND_RATE;
    }
    setTimeout(tick, CHUNK_MS / 2);
  };
  tick();
  fileSender = { cancel: () => { cancelled = true; } };
}

async function playUrl(url, opts) {
  setStatus(`loading ${url}…`);
  const res = await fetch(url, { headers: headersFor(url) });
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
  const samples = await decodeToMono(await res.arrayBuffer());
  setStatus(`streaming ${url} (${(samples.length / SEND_RATE).toFixed(1)} s)`);
  streamPcm(samples, opts);
}

async function playFile(file) {
  const samples = await decodeToMono(await file.arrayBuffer());
  setStatus(`streaming ${file.name} (${(samples.length / SEND_RATE).toFixed(1)} s)`);
  streamPcm(samples);
}

async function toggleMic() {
  if (micStream) { stopMic(); return; }
  if (fileSender) fileSender.cancel();
  micStream = await navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: true, noiseSuppression: true, channelCount: 1 },
  });
  audioCtx = new AudioContext();
  await audioCtx.audioWorklet.addModule("/static/mic-worklet.js");
  const source = audioCtx.createMediaStreamSource(micStream);
  micNode = new AudioWorkletNode(audioCtx, "pcm-chunker", {
    processorOptions: { chunk: Math.round((audioCtx.sampleRate * CHUNK_MS) / 1000) },
  });
  sendStart(audioCtx.sampleRate, "f32le");
  micNode.port.onmessage = (ev) => { if (ws && ws.readyState === WebSocket.OPEN) ws.send(ev.data); };
  source.connect(micNode);
  $("mic").classList.add("active");
  setStatus("microphone on — speak");
}

function stopMic() {
  if (micNode) { micNode.port.onmessage = null; micNode.disconnect(); micNode = null; }
  if (micStream) { for (const t of micStream.getTracks()) t.stop(); micStream = null; }
  if (audioCtx) { audioCtx.close(); audioCtx = null; }
  $("mic").classList.remove("active");
}

// ---- stats ------------------------------------------------------------------------------------

function showStats(stats) {
  state.stats = stats;
  state.statsHistory.push(stats);
  if (state.statsHistory.length > 600) state.statsHistory.shift();
  $("stat-fps").textContent = stats.fps?.toFixed(1) ?? "–";
  $("stat-gen-fps").textContent = stats.generated_fps?.toFixed(1) ?? "–";
  $("stat-latency").textContent = stats.latency_ms != null ? `${Math.round(stats.latency_ms)} ms` : "–";
  $("stat-block").textContent = stats.block_ms != null ? `${Math.round(stats.block_ms)} ms` : "–";
  $("stat-dropped").textContent = `${stats.dropped_frames}`;
}

// Count frames actually presented by the <video> element.
function countFrames() {
  const video = $("avatar");
  if (!("requestVideoFrameCallback" in HTMLVideoElement.prototype)) return;
  let windowStart = performance.now();
  let windowFrames = 0;
  const onFrame = (now, meta) => {
    state.presentedFrames = meta.presentedFrames;
    windowFrames += 1;
    if (now - windowStart >= 1000) {
      state.renderFps = (windowFrames * 1000) / (now - windowStart);
      $("stat-render-fps").textContent = state.renderFps.toFixed(1);
      windowStart = now;
      windowFrames = 0;
    }
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

// ---- wiring -----------------------------------------------------------------------------------

function wire() {
  wireReferences();
  $("token").addEventListener("change", () => loadReferences());
  $("connect").onclick = connect;
  $("disconnect").onclick = () => disconnect(true);
  $("mic").onclick = () => toggleMic().catch((err) => setStatus(`microphone: ${err.message}`, true));
  $("sample").onclick = () => playUrl("/v1/sample-audio").catch((err) => setStatus(err.message, true));
  $("audio-file").onchange = () => {
    const file = $("audio-file").files[0];
    if (file) playFile(file).catch((err) => setStatus(`audio file: ${err.message}`, true));
  };
  $("interrupt").onclick = () => {
    if (fileSender) fileSender.cancel();
    if (ws) ws.send(JSON.stringify({ type: "interrupt" }));
  };
  $("stop").onclick = () => {
    if (fileSender) fileSender.cancel();
    stopMic();
    if (ws) ws.send(JSON.stringify({ type: "stop" }));
  };
  $("unmute").onclick = () => { $("avatar").muted = false; $("unmute").hidden = true; };
  window.addEventListener("pagehide", () => {
    // keepalive lets the DELETE outlive the page, so the server frees the session at once.
    if (session && !params.get("session")) {
      fetch(`/v1/sessions/${session.session_id}`, { method: "DELETE", keepalive: true, headers: authHeaders() });
    }
  });
  countFrames();
}

async function main() {
  wire();
  await loadReferences();
  if (params.get("autostart") === "1" || params.get("session")) {
    await connect();
    const audio = params.get("audio");
    if (audio && state.status === "connected") {
      try {
        await playUrl(audio, { loop: params.get("loop") === "1" });
      } catch (err) {
        setStatus(`audio: ${err.message}`, true);
      }
    }
  }
}

main();
