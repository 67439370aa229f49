// The TypeScript codec against the shared vectors the Rust codec writes
// (proto/testdata/frames.json): encoding each message gives the same bytes,
// and decoding those bytes gives the same message.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { fromJson, toJson, type DescMessage, type JsonValue } from "@bufbuild/protobuf";
import * as pb from "../src/gen/client_pb.js";
import { FrameDecoder, Op, decodeBody, encodeEmpty, encodeFrame, parseHeader } from "../src/frame.js";
import { ProtocolError } from "../src/errors.js";

interface Vector {
  name: string;
  op: number;
  seq: number;
  body: JsonValue;
  hex: string;
}

const table = JSON.parse(
  readFileSync(fileURLToPath(new URL("../../../../proto/testdata/frames.json", import.meta.url)), "utf8"),
) as { frames: Vector[] };

const schemas: Record<number, DescMessage | undefined> = {
  [Op.Auth]: pb.AuthSchema,
  [Op.AuthOk]: pb.AuthOkSchema,
  [Op.Ping]: undefined,
  [Op.Pong]: undefined,
  [Op.Push]: pb.PushSchema,
  [Op.Ack]: pb.AckSchema,
  [Op.Upstream]: pb.UpstreamSchema,
  [Op.UpstreamOk]: pb.UpstreamOkSchema,
  [Op.Sub]: pb.SubSchema,
  [Op.SubOk]: pb.SubOkSchema,
  [Op.Unsub]: pb.UnsubSchema,
  [Op.Kick]: pb.KickSchema,
  [Op.Error]: pb.ErrorSchema,
  [Op.PushToken]: pb.PushTokenSchema,
  [Op.PushTokenOk]: pb.PushTokenOkSchema,
};

const hex = (bytes: Uint8Array) => Buffer.from(bytes).toString("hex");
const unhex = (text: string) => new Uint8Array(Buffer.from(text, "hex"));

test("the table has a frame of every op", () => {
  const ops = [...new Set(table.frames.map((frame) => frame.op))].sort((a, b) => a - b);
  assert.deepEqual(ops, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
});

for (const vector of table.frames) {
  test(`${vector.name}: encoding gives the Rust bytes`, () => {
    const schema = schemas[vector.op];
    const bytes = schema
      ? encodeFrame(vector.op, vector.seq, schema, fromJson(schema, vector.body))
      : encodeEmpty(vector.op, vector.seq);
    assert.equal(hex(bytes), vector.hex);
  });

  test(`${vector.name}: decoding the Rust bytes gives the message`, () => {
    const decoder = new FrameDecoder();
    const frames = decoder.push(unhex(vector.hex));
    assert.equal(frames.length, 1);
    const frame = frames[0]!;
    assert.equal(frame.op, vector.op);
    assert.equal(frame.seq, vector.seq);
    assert.equal(decoder.buffered, 0);
    const schema = schemas[vector.op];
    if (schema) {
      assert.deepEqual(toJson(schema, decodeBody(schema, frame)), vector.body);
    } else {
      assert.equal(frame.body.length, 0);
    }
  });
}

test("frames split anywhere and joined in one message decode the same", () => {
  const all = table.frames.map((vector) => unhex(vector.hex));
  const stream = new Uint8Array(all.reduce((sum, bytes) => sum + bytes.length, 0));
  let at = 0;
  for (const bytes of all) {
    stream.set(bytes, at);
    at += bytes.length;
  }
  for (const chunk of [1, 5, 12, 13, 100, stream.length]) {
    const decoder = new FrameDecoder();
    const seen = [];
    for (let from = 0; from < stream.length; from += chunk) {
      seen.push(...decoder.push(stream.slice(from, from + chunk)));
    }
    assert.deepEqual(
      seen.map((frame) => [frame.op, frame.seq]),
      table.frames.map((vector) => [vector.op, vector.seq]),
      `chunks of ${chunk}`,
    );
    assert.equal(decoder.buffered, 0);
  }
});

test("a bad header is refused before its body arrives", () => {
  const header = (bodyLen: number, version: number, op: number) => {
    const bytes = new Uint8Array(12);
    const view = new DataView(bytes.buffer);
    view.setUint32(0, bodyLen);
    view.setUint8(4, version);
    view.setUint8(5, op);
    return bytes;
  };
  const codeOf = (bytes: Uint8Array) => {
    try {
      new FrameDecoder(1024).push(bytes);
    } catch (error) {
      assert.ok(error instanceof ProtocolError);
      assert.equal(error.code, "protocol");
      return error.serverCode;
    }
    return undefined;
  };
  assert.equal(codeOf(header(0xffffffff, 1, Op.Push)), pb.ErrorCode.FRAME_TOO_LARGE);
  assert.equal(codeOf(header(0, 2, Op.Push)), pb.ErrorCode.BAD_VERSION);
  assert.equal(codeOf(header(0, 1, 0)), pb.ErrorCode.UNKNOWN_OP);
  assert.equal(codeOf(header(0, 1, 99)), pb.ErrorCode.UNKNOWN_OP);
  assert.equal(parseHeader(header(5, 1, Op.Ack)).bodyLen, 5);
});

test("an undecodable body is a ProtocolError with BAD_BODY", () => {
  const frame = { op: Op.Push, flags: 0, seq: 0, body: new Uint8Array([0x0a, 0xff]) };
  assert.throws(() => decodeBody(pb.PushSchema, frame), (error: unknown) => {
    return error instanceof ProtocolError && error.serverCode === pb.ErrorCode.BAD_BODY;
  });
});
