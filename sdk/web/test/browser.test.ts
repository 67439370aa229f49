// The SDK inside Debian's headless Chromium against a real `pushgrid dev`
// (PUSHGRID_BIN, default ../../target/debug/pushgrid), started here on port 0
// and restarted on the same addresses for the recovery test. Nothing is
// skipped: a missing browser or binary fails the run.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, rmSync, openSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { chromium, type Browser, type Page } from "playwright-core";

const root = fileURLToPath(new URL("../../../../", import.meta.url));
const binary = process.env.PUSHGRID_BIN ?? join(root, "target", "debug", "pushgrid");
const chromiumPath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const bundle = readFileSync(join(root, "sdk", "web", "dist", "pushgrid.js"), "utf8");

interface Dev {
  child: ChildProcess;
  addrs: Map<string, string>;
}

let dataDir: string;
let dev: Dev;
let browser: Browser;
let page: Page;

async function startDev(listen: Record<string, string>): Promise<Dev> {
  const log = openSync(join(dataDir, "dev.log"), "a");
  const child = spawn(
    binary,
    [
      "dev",
      "--machine-lines",
      "--data-dir",
      join(dataDir, "data"),
      "--heartbeat-secs",
      "5",
      ...Object.entries(listen).flatMap(([flag, addr]) => [`--${flag}`, addr]),
    ],
    { stdio: ["ignore", "pipe", log] },
  );
  const addrs = new Map<string, string>();
  const lines = createInterface({ input: child.stdout! });
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`pushgrid dev not ready in 60 s; see ${dataDir}/dev.log`)), 60_000);
    child.once("exit", (code) => reject(new Error(`pushgrid dev exited (${code}); see ${dataDir}/dev.log`)));
    lines.on("line", (line) => {
      const [prefix, role, name, addr] = line.split(/\s+/);
      if (prefix !== "PUSHGRID_BOUND" || !addr) return;
      if (role === "dev" && name === "ready") {
        clearTimeout(timer);
        resolve();
      }
      addrs.set(`${role}/${name}`, addr);
    });
  });
  return { child, addrs };
}

/** SIGTERM (the rooms drain), SIGKILL when it is not gone within 20 s. */
function stopDev(stopping: Dev): Promise<void> {
  return new Promise((resolve) => {
    if (stopping.child.exitCode !== null || stopping.child.signalCode !== null) return resolve();
    const kill = setTimeout(() => stopping.child.kill("SIGKILL"), 20_000);
    stopping.child.once("exit", () => {
      clearTimeout(kill);
      resolve();
    });
    stopping.child.kill("SIGTERM");
  });
}

const addr = (name: string) => {
  const value = dev.addrs.get(name);
  if (!value) throw new Error(`dev did not announce ${name}: ${[...dev.addrs.keys()].join(", ")}`);
  return value;
};

/**
 * Calls the push API. A 503 (a role not reachable yet, as right after a
 * restart) is retried for up to 20 s, with one idempotency key per push so a
 * retry delivers once (docs/api.md).
 */
async function api(method: string, body: Record<string, unknown>): Promise<any> {
  const call = method === "push" ? { ...body, idempotency_key: `k-${Date.now()}-${Math.random()}` } : body;
  const deadline = Date.now() + 20_000;
  for (;;) {
    const response = await fetch(`http://${addr("center/http")}/api/${method}`, {
      method: "POST",
      headers: { Authorization: "apikey demo-key", "Content-Type": "application/json" },
      body: JSON.stringify(call),
    });
    const answer = (await response.json()) as any;
    if (response.status === 503 && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 200));
      continue;
    }
    assert.equal(response.status, 200, JSON.stringify(answer));
    return answer.result;
  }
}

/** An HS256 token for the demo app, `ttlSecs` from now (negative: expired). */
function token(user: string, ttlSecs: number): string {
  const part = (value: object) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  const unsigned = `${part({ alg: "HS256", typ: "JWT" })}.${part({ sub: user, app: "demo", exp: now + ttlSecs, iat: now - 60 })}`;
  return `${unsigned}.${createHmac("sha256", "demo-secret").update(unsigned).digest("base64url")}`;
}

async function until<T>(what: string, probe: () => Promise<T | undefined | false>, ms = 15_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** Starts a client in the page under `name`; its events are kept in window.clients[name]. */
async function startClient(name: string, options: Record<string, unknown>): Promise<void> {
  await page.evaluate(
    ({ name, options, ws }) => {
      const w = window as any;
      w.clients ??= {};
      // A WebSocket the test can cut off: while window.blockWs is set, every
      // new connection goes to a closed port (the network is down).
      class BlockableWebSocket extends WebSocket {
        constructor(url: string) {
          super(w.blockWs ? "ws://127.0.0.1:1/" : url);
        }
      }
      const state: any = { messages: [], events: [], refreshes: 0 };
      const client = new w.pushgrid.PushgridClient({
        urls: [ws],
        deviceId: `browser-${name}`,
        reconnectBackoffMinMs: 100,
        reconnectBackoffMaxMs: 400,
        WebSocket: BlockableWebSocket,
        ...options,
        ...(options.refresh ? { refreshToken: async () => { state.refreshes += 1; return await w.freshToken(options.user); } } : {}),
      });
      client.on("message", (m: any) => {
        state.messages.push({ id: String(m.id), kind: m.kind, topic: m.topic, offset: String(m.offset), text: m.text });
      });
      client.on("connected", (e: any) => state.events.push({ type: "connected", connects: e.connects }));
      client.on("disconnected", (e: any) => state.events.push({ type: "disconnected", reason: e.reason, willReconnect: e.willReconnect }));
      client.on("kicked", (e: any) => state.events.push({ type: "kicked", code: e.code, kickCode: e.kickCode, name: e.name }));
      client.on("subscribed", (e: any) => state.events.push({ type: "subscribed", topic: e.topic, recovered: e.recovered, missed: e.missed, offset: String(e.offset) }));
      client.on("error", (e: any) => state.events.push({ type: "error", code: e.code, name: e.name, message: e.message }));
      state.client = client;
      w.clients[name] = state;
      state.ready = client.connect().then(
        () => "connected",
        (e: any) => `${e.name}: ${e.message}`,
      );
    },
    { name, options, ws: `ws://${addr("room/ws")}/` },
  );
}

const stateOf = (name: string) =>
  page.evaluate((name) => {
    const state = (window as any).clients[name];
    return { messages: state.messages, events: state.events, refreshes: state.refreshes, connected: state.client.connected };
  }, name);

const connected = (name: string) =>
  Promise.race([
    page.evaluate((name) => (window as any).clients[name].ready, name),
    new Promise<string>((resolve) => setTimeout(() => resolve(`${name}: not connected within 20 s`), 20_000).unref()),
  ]);

async function messageState(id: string): Promise<string> {
  return (await api("message_status", { id })).state;
}

before(async () => {
  assert.ok(existsSync(binary), `${binary} is missing: build the workspace (cargo build) or set PUSHGRID_BIN`);
  assert.ok(existsSync(chromiumPath), `${chromiumPath} is missing: apt-get install -y chromium (.ci/run installs it)`);
  dataDir = mkdtempSync(join(tmpdir(), "pushgrid-web-"));
  dev = await startDev({
    "dispatcher-listen": "127.0.0.1:0",
    "center-listen": "127.0.0.1:0",
    "room-listen": "127.0.0.1:0",
    "ws-listen": "127.0.0.1:0",
    "demo-listen": "127.0.0.1:0",
  });
  browser = await chromium.launch({
    executablePath: chromiumPath,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  page = await browser.newPage();
  page.on("pageerror", (error) => console.error("page error:", error));
  await page.exposeFunction("freshToken", (user: string) => token(user, 3600));
  // A page of dev's own demo server, then this build of the SDK in it.
  await page.goto(`http://${addr("dev/demo")}/demo`);
  await page.addScriptTag({ content: bundle });
});

after(async () => {
  await browser?.close();
  if (dev) await stopDev(dev);
  if (dataDir) rmSync(dataDir, { recursive: true, force: true });
});

test("connects, receives a push and acknowledges it after the handler", async () => {
  await startClient("ann", { token: token("ann", 3600) });
  assert.equal(await connected("ann"), "connected");
  const pushed = await api("push", { users: ["ann"], payload: "hello ann" });
  const id: string = pushed.messages[0].id;
  const state = await until("ann's push", async () => {
    const state = await stateOf("ann");
    return state.messages.length > 0 && state;
  });
  assert.deepEqual(state.messages, [{ id, kind: "unicast", topic: "", offset: "0", text: "hello ann" }]);
  await until(`${id} acked in the store`, async () => (await messageState(id)) === "acked");
});

test("messages pushed while offline arrive on connect, acked ones never again", async () => {
  const first = (await api("push", { users: ["bob"], payload: "while offline 1" })).messages[0].id;
  const second = (await api("push", { users: ["bob"], payload: "while offline 2" })).messages[0].id;
  await startClient("bob", { token: token("bob", 3600) });
  const state = await until("bob's offline messages", async () => {
    const state = await stateOf("bob");
    return state.messages.length >= 2 && state;
  });
  assert.deepEqual(state.messages.map((m: any) => [m.id, m.text]), [
    [first, "while offline 1"],
    [second, "while offline 2"],
  ]);
  await until("both acked", async () => (await messageState(first)) === "acked" && (await messageState(second)) === "acked");

  // A new connection: acked messages are not shown again (the server does
  // not send them, or the SDK drops the copy by id and acks it again).
  await page.evaluate(() => (window as any).clients.bob.client.reconnect());
  await until("bob reconnected", async () => {
    const state = await stateOf("bob");
    return state.connected && state.events.filter((e: any) => e.type === "connected").length >= 2;
  });
  const third = (await api("push", { users: ["bob"], payload: "after reconnect" })).messages[0].id;
  const again = await until("the new message", async () => {
    const state = await stateOf("bob");
    return state.messages.length > 2 && state;
  });
  assert.deepEqual(again.messages.map((m: any) => m.id), [first, second, third], "an acked message was shown again");
});

test("a topic's broadcasts arrive in offset order", async () => {
  await startClient("carl", { token: token("carl", 3600) });
  assert.equal(await connected("carl"), "connected");
  await page.evaluate(() => (window as any).clients.carl.client.subscribe("news"));
  const offsets: string[] = [];
  for (let n = 1; n <= 5; n++) {
    offsets.push(String((await api("broadcast", { topic: "news", payload: `news ${n}` })).offset));
  }
  const state = await until("five broadcasts", async () => {
    const state = await stateOf("carl");
    return state.messages.length >= 5 && state;
  });
  assert.deepEqual(
    state.messages.map((m: any) => [m.kind, m.topic, m.offset, m.text]),
    offsets.map((offset, n) => ["broadcast", "news", offset, `news ${n + 1}`]),
  );
});

test("after the room restarts, the broadcasts missed meanwhile are recovered from the last offset", async () => {
  const before = await stateOf("carl");
  const lastOffset = BigInt(before.messages.at(-1).offset);
  // The network goes down and the whole of pushgrid dev restarts on the same addresses.
  await page.evaluate(() => ((window as any).blockWs = true));
  const listen = {
    "dispatcher-listen": addr("dispatcher/http"),
    "center-listen": addr("center/http"),
    "room-listen": addr("room/tcp"),
    "ws-listen": addr("room/ws"),
    "demo-listen": addr("dev/demo"),
  };
  await stopDev(dev);
  await until("carl disconnected", async () => !(await stateOf("carl")).connected);
  dev = await startDev(listen);
  const offsets: string[] = [];
  for (let n = 1; n <= 3; n++) {
    offsets.push(String((await api("broadcast", { topic: "news", payload: `missed ${n}` })).offset));
  }
  assert.deepEqual(
    offsets,
    [1n, 2n, 3n].map((step) => String(lastOffset + step)),
    "the topic's stream went on from the last offset",
  );
  const connectsBefore = (await stateOf("carl")).events.filter((e: any) => e.type === "connected").length;
  await page.evaluate(() => ((window as any).blockWs = false));
  const state = await until(
    "the resubscription",
    async () => {
      const state = await stateOf("carl");
      const connects = state.events.filter((e: any) => e.type === "connected").length;
      return connects > connectsBefore && state.events.at(-1).type === "subscribed" && state;
    },
    30_000,
  );
  assert.deepEqual(state.events.at(-1), { type: "subscribed", topic: "news", recovered: true, missed: false, offset: offsets[2] });
  assert.deepEqual(
    state.messages.slice(before.messages.length).map((m: any) => [m.offset, m.text]),
    offsets.map((offset, n) => [offset, `missed ${n + 1}`]),
  );
});

test("a KICK is reported and the client reconnects", async () => {
  await startClient("dora", { token: token("dora", 3600) });
  assert.equal(await connected("dora"), "connected");
  const kicked = await api("kick", { user: "dora", reason: "testing" });
  assert.equal(kicked.kicked, 1);
  const state = await until("the kick and the reconnect", async () => {
    const state = await stateOf("dora");
    return state.events.filter((e: any) => e.type === "connected").length >= 2 && state;
  });
  const kick = state.events.find((e: any) => e.type === "kicked");
  assert.deepEqual(kick, { type: "kicked", code: "kicked", kickCode: 4, name: "KickedError" });
  const id = (await api("push", { users: ["dora"], payload: "after the kick" })).messages[0].id;
  await until("a push after the reconnect", async () => (await stateOf("dora")).messages.some((m: any) => m.id === id));
});

test("an expired token is refreshed through the callback", async () => {
  await startClient("eve", { token: token("eve", -600), refresh: true, user: "eve" });
  assert.equal(await connected("eve"), "connected");
  const state = await stateOf("eve");
  assert.equal(state.refreshes, 1);
  const id = (await api("push", { users: ["eve"], payload: "fresh" })).messages[0].id;
  await until("eve's push", async () => (await stateOf("eve")).messages.some((m: any) => m.id === id));

  // Without a callback, the refusal is an AuthError and the client stops.
  await startClient("eve2", { token: token("eve", -600) });
  assert.match(await connected("eve2"), /^AuthError: authentication refused \(AUTH_FAILED\)/);
  const refused = await stateOf("eve2");
  assert.equal(refused.events.find((e: any) => e.type === "error")?.code, "auth_failed");
});

test("the demo page connects a user and shows what its form pushes", async () => {
  const demo = await browser.newPage();
  await demo.goto(`http://${addr("dev/demo")}/demo`);
  await demo.fill("#user", "frank");
  await demo.click("#connect button");
  await demo.waitForFunction(() => document.getElementById("status")!.textContent!.startsWith("connected as frank"), null, { timeout: 15_000 });
  await demo.fill("#payload", "hi from the form");
  await demo.click("#push button");
  await demo.waitForFunction(() => document.getElementById("messages")!.textContent!.includes("unicast: hi from the form"), null, { timeout: 15_000 });
  // The push can reach the page over its WebSocket before the API's answer
  // reaches the form: wait for the answer too.
  await demo.waitForFunction(() => document.getElementById("push-result")!.textContent !== "", null, { timeout: 15_000 });
  assert.match(await demo.textContent("#push-result") ?? "", /^pushed, id \d+$/);
  await demo.close();
});
