// Keyframes out of a Motion Server animation envelope (the bytes of one `frames` message).
//
// The envelope is a protobuf `Message` (type 5) whose `server_response_animation` (field 6)
// holds `animation` (field 4): repeated `Flame` keyframes (field 1), each seven packed float
// arrays (translation 1, rotation 2, neck_pose 3, jaw_pose 4, eye_pose 5, eye_lid 6,
// expression 7), as relay/dev/motion_sim/proto.py lays them out. Reading these few fields by
// hand is about forty lines; a protobuf runtime plus the schema would be a second dependency for
// a dev page, and the real AvatarKit SDK does this itself anyway.

const FLAME_FIELDS = ["translation", "rotation", "neck_pose", "jaw_pose", "eye_pose", "eye_lid", "expression"];

function varint(view, at) {
  let value = 0;
  let scale = 1;
  for (;;) {
    const byte = view.getUint8(at.pos++);
    value += (byte & 0x7f) * scale;
    if (byte < 0x80) return value;
    scale *= 128;
  }
}

/** Yield [fieldNumber, wireType, payload] for each field of one message (payload: a sub-view or a number). */
function* fields(view) {
  const at = { pos: 0 };
  while (at.pos < view.byteLength) {
    const key = varint(view, at);
    const number = Math.floor(key / 8);
    const type = key & 7;
    if (type === 0) yield [number, type, varint(view, at)];
    else if (type === 2) {
      const length = varint(view, at);
      yield [number, type, new DataView(view.buffer, view.byteOffset + at.pos, length)];
      at.pos += length;
    } else if (type === 5) { yield [number, type, view.getFloat32(at.pos, true)]; at.pos += 4; }
    else if (type === 1) { at.pos += 8; }
    else throw new Error(`unsupported protobuf wire type ${type}`);
  }
}

function floats(view) {
  const out = [];
  for (let i = 0; i + 4 <= view.byteLength; i += 4) out.push(view.getFloat32(i, true));
  return out;
}

function flame(view) {
  const keyframe = Object.fromEntries(FLAME_FIELDS.map((name) => [name, []]));
  for (const [number, type, payload] of fields(view)) {
    const name = FLAME_FIELDS[number - 1];
    if (!name) continue;
    if (type === 2) keyframe[name].push(...floats(payload));
    else if (type === 5) keyframe[name].push(payload);
  }
  return keyframe;
}

/** {type, reqId, end, keyframes: [{jaw_pose: [...], eye_lid: [...], ...}]} of one envelope. */
export function decodeAnimation(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const result = { type: 0, reqId: "", end: false, keyframes: [] };
  for (const [number, type, payload] of fields(view)) {
    if (number === 1 && type === 0) result.type = payload;
    if (number !== 6 || type !== 2) continue;
    for (const [n, t, inner] of fields(payload)) {
      if (n === 2 && t === 2) result.reqId = new TextDecoder().decode(inner);
      else if (n === 3 && t === 0) result.end = inner !== 0;
      else if (n === 4 && t === 2) {
        for (const [k, kt, frame] of fields(inner)) if (k === 1 && kt === 2) result.keyframes.push(flame(frame));
      }
    }
  }
  return result;
}

/** How open the mouth is, 0..1: the simulator sets jaw_pose[0] to half the opening. */
export function mouthOpening(keyframe) {
  return Math.max(0, Math.min(1, 2 * (keyframe.jaw_pose[0] ?? 0)));
}
