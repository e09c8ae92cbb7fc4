// The client test vectors (relay/client/vectors/) against this library's state machine:
// decodeMessage -> StreamPosition -> AvatarKitAdapter, the same path RelayClient takes.
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { test } from "node:test";

import { AvatarKitAdapter, decodeMessage, StreamPosition } from "../relay-client.js";

const dir = new URL("../../vectors/", import.meta.url);
const files = readdirSync(dir).filter((name) => name.endsWith(".json")).sort();
const b64 = (bytes) => Buffer.from(bytes).toString("base64");

/** Records calls in the vectors' notation; yieldAudioData returns what the step says. */
export class RecordingController {
  constructor() {
    this.calls = [];
    this.returns = [];
  }

  yieldAudioData(audio, end) {
    const returns = this.returns.length ? this.returns.shift() : null;
    this.calls.push({ method: "yieldAudioData", audio: { $bytes: b64(audio) }, end, returns });
    return returns;
  }

  yieldFramesData(frames, conversationId) {
    this.calls.push({ method: "yieldFramesData", frames: frames.map((f) => ({ $bytes: b64(f) })), conversation_id: conversationId });
  }

  interrupt() {
    this.calls.push({ method: "interrupt" });
  }
}

test("there are vectors to run", () => {
  assert.ok(files.length >= 9, `only ${files.length} vector files in ${dir}`);
});

for (const file of files) {
  test(`vector ${file}`, async () => {
    const vector = JSON.parse(readFileSync(new URL(file, dir), "utf8"));
    const controller = new RecordingController();
    // An asynchronous SDK (each call a promise) must give the same calls in the same order.
    const adapter = new AvatarKitAdapter(controller);
    const position = new StreamPosition(vector.initial_last_id);
    for (const [number, step] of vector.steps.entries()) {
      if (step.reconnect) {
        assert.equal(position.lastId, step.reconnect.last_id, `step ${number}`);
        continue;
      }
      for (const call of step.calls) if (call.method === "yieldAudioData") controller.returns.push(call.returns);
      const before = controller.calls.length;
      const message = decodeMessage(Buffer.from(step.receive.$bytes, "base64"));
      if (position.accept(message)) assert.ok(adapter.push(message));
      await adapter.whenIdle();
      assert.deepEqual(controller.calls.slice(before), step.calls, `step ${number}: ${step.note ?? ""}`);
    }
    assert.equal(position.lastId, vector.final_last_id);
  });
}

test("an asynchronous controller gets its calls strictly one after another", async () => {
  const vector = JSON.parse(readFileSync(new URL("interrupt.json", dir), "utf8"));
  const log = [];
  let inFlight = 0;
  const slow = (name, value) => async (...args) => {
    inFlight += 1;
    assert.equal(inFlight, 1, `${name} overlapped another call`);
    await new Promise((resolve) => setTimeout(resolve, 1));
    log.push(name);
    inFlight -= 1;
    return value(...args);
  };
  const returns = vector.steps.flatMap((s) => s.calls ?? []).filter((c) => c.method === "yieldAudioData").map((c) => c.returns);
  const adapter = new AvatarKitAdapter({
    yieldAudioData: slow("yieldAudioData", () => returns.shift()),
    yieldFramesData: slow("yieldFramesData", () => undefined),
    interrupt: slow("interrupt", () => undefined),
  });
  const position = new StreamPosition();
  for (const step of vector.steps) {
    if (!step.receive) continue;
    const message = decodeMessage(Buffer.from(step.receive.$bytes, "base64"));
    if (position.accept(message)) adapter.push(message); // all pushed at once, no waiting
  }
  await adapter.whenIdle();
  const expected = vector.steps.flatMap((s) => s.calls ?? []).map((c) => c.method);
  assert.deepEqual(log, expected);
});
