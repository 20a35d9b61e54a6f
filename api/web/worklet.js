// Runs on the audio thread: Float32 blocks of 128 samples in, batches of Int16 out to the page.
class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.batch = options.processorOptions.batchSamples; // ~80 ms
    this.buffer = new Int16Array(this.batch);
    this.filled = 0;
    this.peak = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true;
    for (let i = 0; i < channel.length; i++) {
      const s = Math.max(-1, Math.min(1, channel[i]));
      this.buffer[this.filled++] = s < 0 ? s * 0x8000 : s * 0x7fff;
      this.peak = Math.max(this.peak, Math.abs(s));
      if (this.filled === this.batch) {
        this.port.postMessage({ pcm: this.buffer.buffer, peak: this.peak }, [this.buffer.buffer]);
        this.buffer = new Int16Array(this.batch);
        this.filled = 0;
        this.peak = 0;
      }
    }
    return true;
  }
}

registerProcessor("capture-processor", CaptureProcessor);
