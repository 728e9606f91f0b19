// AudioWorklet that turns the microphone's 128-sample render quanta into fixed-size chunks of
// mono float32 PCM (f32le) posted to the page, which sends them over the websocket.
class PcmChunker extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.chunk = options.processorOptions.chunk;
    this.buffer = new Float32Array(this.chunk);
    this.filled = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return true;
    const left = input[0];
    const right = input[1];
    for (let i = 0; i < left.length; i++) {
      this.buffer[this.filled++] = right ? 0.5 * (left[i] + right[i]) : left[i];
      if (this.filled === this.chunk) {
        this.port.postMessage(this.buffer.buffer, [this.buffer.buffer]);
        this.buffer = new Float32Array(this.chunk);
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor("pcm-chunker", PcmChunker);
