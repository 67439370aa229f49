#!/usr/bin/env python3
"""Runs one `loadtest push-rate` against a fresh `pushgrid dev` or `pushgrid
cluster` (the release binaries under target/release) and writes its JSON report
with a meta block (command, commit, date, machine, load average) and each
role's step histograms and counters read from its /metrics before the server stops
(`server_step_metrics`). The reports under docs/bench/push-rate-*.json were
made with it.

usage: python3 loadtest/scripts/push_rate_report.py dev|cluster OUT.json [loadtest push-rate flags...]
  e.g. ... dev docs/bench/push-rate-dev-10000.json --connections 5000 --secs 10 --rate 10000 --push-concurrency 64
env: NOTE (meta note), COMMIT (overrides git HEAD), CLUSTER_ARGS (extra `pushgrid cluster` flags),
     BIN (binaries directory). cluster mode needs Redis (db 9 is flushed) and MariaDB (a fresh
     database is created and dropped). dev uses ports 18060-18091; cluster the defaults (8080, 8090).
"""
import json, os, re, signal, subprocess, sys, tempfile, time, platform, datetime, socket

WT = os.environ.get("WT", os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
BIN = os.environ.get("BIN", f"{WT}/target/release")
mode, out, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
tmp = tempfile.mkdtemp(prefix="pgbench-")

def wait_port(host, port, secs=120):
    end = time.time() + secs
    while time.time() < end:
        try:
            socket.create_connection((host, port), 0.5).close(); return
        except OSError: time.sleep(0.2)
    raise SystemExit(f"{host}:{port} never answered")

def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]

log = open(f"{tmp}/server.log", "w")
if mode == "dev":
    server = subprocess.Popen([f"{BIN}/pushgrid", "dev", "--data-dir", f"{tmp}/data", "--center-listen", "127.0.0.1:18080",
        "--room-listen", "127.0.0.1:18090", "--ws-listen", "127.0.0.1:18091", "--dispatcher-listen", "127.0.0.1:18070",
        "--demo-listen", "127.0.0.1:18060", "--machine-lines"], stdout=log, stderr=log, env={**os.environ, "RUST_LOG": "warn"})
    api, room = "http://127.0.0.1:18080", "127.0.0.1:18090"
    wait_port("127.0.0.1", 18080); wait_port("127.0.0.1", 18090)
    time.sleep(2)
    pids = [server.pid]
    server_desc = "pushgrid dev --data-dir <fresh> (release build)"
else:
    db = "pg_bench_" + str(int(time.time()))
    subprocess.run(["mariadb", "-h127.0.0.1", "-uroot", "-e", f"CREATE DATABASE {db}"], check=True)
    subprocess.run(["redis-cli", "-n", "9", "FLUSHDB"], check=True, capture_output=True)
    server = subprocess.Popen([f"{BIN}/pushgrid", "cluster", "--redis", "redis://127.0.0.1:6379/9",
        "--mysql", f"mysql://root@127.0.0.1:3306/{db}", "--admin-listen", "127.0.0.1:19099"] + os.environ.get("CLUSTER_ARGS", "").split(),
        stdout=log, stderr=log, env={**os.environ, "RUST_LOG": "warn"})
    api, room = "http://127.0.0.1:8080", "127.0.0.1:8090"
    wait_port("127.0.0.1", 8080, 300); wait_port("127.0.0.1", 8090, 300)
    time.sleep(3)
    pids = children(server.pid)
    server_desc = f"pushgrid cluster --redis redis://127.0.0.1:6379/9 --mysql mysql://root@127.0.0.1:3306/<fresh db> {os.environ.get('CLUSTER_ARGS','')} (release build; durability mysql, the default)"
cmd = [f"{BIN}/loadtest", "push-rate", "--rooms", room, "--api", api, "--server-pids", ",".join(map(str, pids)),
       "--json", f"{tmp}/report.json", "--quiet", "--source-base", "127.0.1.2"] + extra
la0 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
rc = subprocess.run(cmd).returncode
la1 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
# Each role's step histograms (sum and count: the mean of each step) and
# counters, read from its /metrics before the server stops.
import urllib.request
steps = {}
log.flush()
for line in open(f"{tmp}/server.log", errors="replace"):
    m_ = re.search(r"PUSHGRID_BOUND (\S+) admin (\S+)", line)
    if not m_: continue
    role, addr = m_.groups()
    try:
        text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
    except Exception as error:
        steps[f"{role}@{addr}"] = f"unreadable: {error}"; continue
    mine = {}
    for metric in text.splitlines():
        mm = re.match(r'(pushgrid_[a-z_]+(?:_(?:seconds|items|calls|rows)(?:_sum|_count)|_total))(\{[^}]*\})? ([0-9.e+-]+)', metric)
        if mm and 'le=' not in (mm.group(2) or ''):
            mine[mm.group(1) + (mm.group(2) or '')] = float(mm.group(3))
    steps[f"{role}@{addr}"] = mine
server.send_signal(signal.SIGTERM)
try: server.wait(60)
except subprocess.TimeoutExpired: server.kill()
if mode != "dev":
    subprocess.run(["mariadb", "-h127.0.0.1", "-uroot", "-e", f"DROP DATABASE {db}"])
if rc != 0 or not os.path.exists(f"{tmp}/report.json"):
    raise SystemExit(f"loadtest rc={rc}; server log {tmp}/server.log")
report = json.load(open(f"{tmp}/report.json"))
commit = os.environ.get("COMMIT") or subprocess.run(["git", "-C", WT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = "" if os.environ.get("COMMIT") else subprocess.run(["git", "-C", WT, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
cpu = re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read()).group(1)
report["server_step_metrics"] = steps
report["meta"] = {
    "command": " ".join(["loadtest"] + cmd[1:]).replace(f"{tmp}/", "<tmp>/"),
    "commit": commit + (" (with uncommitted changes: " + os.environ.get("DIRTY_NOTE", "see note") + ")" if dirty else ""),
    "date": started,
    "machine": {"cpu_model": cpu, "cpus": os.cpu_count(), "kernel": platform.release(),
                "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
    "server": server_desc,
    "load_average_before_after": [la0, la1],
    "note": os.environ.get("NOTE", "2 vCPUs shared by the servers, Redis, MariaDB and the load generator"),
}
os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
json.dump(report, open(out, "w"), indent=1)
m = report["messages"]; lat = m["latency_ms"]; pr = report.get("push_rate") or {}
print(json.dumps({"out": out, "accepted": m["accepted"], "delivered": m["delivered"], "lost": m["lost"], "dup": m["duplicated"],
      "misrouted": m["misrouted"], "p50": lat["p50"], "p99": lat["p99"], "p999": lat["p999"], "push_rate": pr}, default=str)[:1500])
