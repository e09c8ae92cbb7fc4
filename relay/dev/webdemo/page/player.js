// A stand-in for the AvatarKit Web controller, with its method names, for the demo page when the
// real SDK is absent: it plays the PCM through Web Audio and keeps the keyframes on the audio's
// clock so the page can draw the face the frames describe. It follows the SDK's documented
// behaviour: yieldAudioData returns a fresh conversation id for the first audio of a reply (after
// an end or an interrupt) and null otherwise; frames for another id are dropped; an empty frames
// call switches that conversation to audio only; interrupt() stops playback and clears all.

import { decodeAnimation } from "./animation.js";

export const FPS = 25;

export class StandInAvatarController {
  constructor({ sampleRate = 16000, audioContext = null, onEvent = () => {} } = {}) {
    this.sampleRate = sampleRate;
    this.context = audioContext ?? new AudioContext({ sampleRate });
    this.onEvent = onEvent;
    this.conversation = null; // the reply being played: {id, segments, audio, keyframes, audioOnly, ended}
    this.history = []; // every reply, newest last (tests read the scheduled audio from here)
    this.interrupts = 0;
    this.dropped = 0; // frames calls for an id that is not the current one
    this._sources = new Set();
    this._nextTime = 0;
    this._count = 0;
  }

  async initializeAudioContext() {
    if (this.context.state !== "running") await this.context.resume();
  }

  yieldAudioData(audio, end) {
    let fresh = null;
    if (this.conversation === null || this.conversation.ended) {
      this._count += 1;
      fresh = `standin-${this._count}`;
      this.conversation = { id: fresh, segments: [], audio: [], bytes: 0, keyframes: [], audioOnly: false, ended: false };
      this.history.push(this.conversation);
    }
    const reply = this.conversation;
    if (audio.byteLength > 0) this._schedule(reply, audio);
    if (end) reply.ended = true;
    this.onEvent({ kind: "sdk_audio", id: reply.id, bytes: audio.byteLength, end });
    return fresh;
  }

  yieldFramesData(frames, conversationId) {
    const reply = this.conversation;
    if (reply === null || reply.id !== conversationId) {
      this.dropped += 1;
      return;
    }
    if (frames.length === 0) {
      reply.audioOnly = true;
      this.onEvent({ kind: "sdk_audio_only", id: reply.id });
      return;
    }
    if (reply.audioOnly) return; // the SDK ignores motion once a reply is audio only
    for (const envelope of frames) reply.keyframes.push(...decodeAnimation(envelope).keyframes);
    this.onEvent({ kind: "sdk_frames", id: reply.id, keyframes: reply.keyframes.length });
  }

  interrupt() {
    for (const source of this._sources) {
      source.onended = null;
      source.stop();
    }
    this._sources.clear();
    this._nextTime = 0;
    if (this.conversation) this.conversation.interrupted = true;
    this.conversation = null;
    this.interrupts += 1;
    this.onEvent({ kind: "sdk_interrupt" });
  }

  /** Sources scheduled and not yet finished. */
  get playing() {
    return this._sources.size;
  }

  /** Seconds of the latest reply's audio heard so far (its position on the audio clock). */
  heardSeconds(reply = this.history[this.history.length - 1]) {
    if (!reply || reply.segments.length === 0) return 0;
    const now = this.context.currentTime;
    // The chunk playing now; gaps (audio arriving late) hold the position at a chunk's end.
    let heard = 0;
    for (const { at, from, seconds } of reply.segments) {
      if (now < at) break;
      heard = from + Math.min(seconds, now - at);
    }
    return heard;
  }

  /** The keyframe of the reply being heard right now, or null (idle, audio only, none yet). */
  currentKeyframe() {
    const reply = this.history[this.history.length - 1];
    if (!reply || reply.interrupted || reply.audioOnly || reply.segments.length === 0) return null;
    const last = reply.segments[reply.segments.length - 1];
    const heard = this.heardSeconds(reply);
    if (this.context.currentTime > last.at + last.seconds + 0.2) return null; // finished
    // Keyframe i animates audio from i/25 s: frames follow the audio, not the arrival time.
    const index = Math.floor(heard * FPS);
    return index < reply.keyframes.length ? reply.keyframes[index] : null;
  }

  _schedule(reply, audio) {
    const bytes = audio instanceof Uint8Array ? audio : new Uint8Array(audio);
    reply.audio.push(bytes.slice());
    reply.bytes += bytes.byteLength;
    const samples = Math.floor(bytes.byteLength / 2);
    const view = new DataView(bytes.buffer, bytes.byteOffset, samples * 2);
    const buffer = this.context.createBuffer(1, Math.max(1, samples), this.sampleRate);
    const channel = buffer.getChannelData(0);
    for (let i = 0; i < samples; i++) channel[i] = view.getInt16(2 * i, true) / 32768;
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.context.destination);
    // Back to back on the audio clock, with a small lead so the first chunk is not clipped.
    const at = Math.max(this.context.currentTime + 0.05, this._nextTime);
    const from = reply.segments.reduce((sum, segment) => sum + segment.seconds, 0);
    reply.segments.push({ at, from, seconds: buffer.duration });
    source.start(at);
    this._nextTime = at + buffer.duration;
    this._sources.add(source);
    source.onended = () => this._sources.delete(source);
  }
}
