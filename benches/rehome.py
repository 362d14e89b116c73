#!/usr/bin/env python3
"""Time to re-home after `kill -9`: how long the conversations of a killed node go unanswered.

A client on the first node sends to every conversation in turn, one send in flight per conversation,
resending unacked sends (same msg_id) after an error. After a steady second the node given by --kill-pid is
killed with SIGKILL. For each conversation that node owned (read from GET /v1/cluster before and the
placement after), the gap is the time from the kill to that conversation's first ack of a send made after
the kill. Prints the gaps' max and median, and the time until the survivors list the node as down.

    pip install websockets
    python3 benches/rehome.py --node http://127.0.0.1:18080 --kill-pid $(pgrep -f 'node-name n2') \
        --conversations 60

Loopback only; bounded to --seconds after the kill.
"""
import argparse
import asyncio
import json
import os
import signal
import statistics
import time
import urllib.request
import uuid

import websockets


MASK = (1 << 64) - 1


def score(node, conv):
    """The rendezvous weight of cluster/src/placement.rs (FNV-1a, SplitMix64 finish)."""
    h = 0xCBF29CE484222325
    for b in node.encode() + b"\xff" + conv.encode():
        h = ((h ^ b) * 0x100000001B3) & MASK
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & MASK
    return h ^ (h >> 31)


def owner(conv, nodes):
    return max(nodes, key=lambda n: (score(n, conv), n))


def call(url, body=None, token=None):
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = "Bearer " + token
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=10) as r:
        return json.loads(r.read())


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--node", required=True, help="HTTP address of the node the client uses")
    p.add_argument("--kill-pid", type=int, required=True, help="pid of the node to kill (not --node)")
    p.add_argument("--conversations", type=int, default=60)
    p.add_argument("--seconds", type=float, default=10.0)
    a = p.parse_args()
    assert "127." in a.node or "localhost" in a.node, "loopback only"
    me = "rehome-" + uuid.uuid4().hex[:8]
    token = call(a.node + "/v1/dev/token", {"user": me})["token"]
    convs = [call(a.node + "/v1/conversations", {"kind": "group", "name": f"r{i}", "members": []}, token)["id"]
             for i in range(a.conversations)]
    ws = await websockets.connect(a.node.replace("http", "ws") + "/v1/ws?token=" + token)
    pending = {}  # msg_id -> (conv, sent_at)
    first_ack_after = {}
    killed_at = None
    counter = 0

    async def send(conv, msg_id=None):
        nonlocal counter
        if msg_id is None:
            counter += 1
            msg_id = f"{me}-{counter}"
        pending[msg_id] = (conv, time.monotonic())
        await ws.send(json.dumps({"op": "send", "msg_id": msg_id, "conv": conv, "body": "x"}))

    for c in convs:
        await send(c)
    started = time.monotonic()
    down_at = None
    while True:
        now = time.monotonic()
        if killed_at is None and now - started > 1.0:
            before = {n["name"] for n in call(a.node + "/v1/cluster")["nodes"] if n["state"] == "up"}
            killed_at = time.monotonic()
            os.kill(a.kill_pid, signal.SIGKILL)
        if killed_at and now - killed_at > a.seconds:
            break
        if killed_at and down_at is None:
            states = {n["name"]: n["state"] for n in call(a.node + "/v1/cluster")["nodes"]}
            if any(s == "down" for s in states.values()):
                down_at = time.monotonic()
        try:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 0.05))
        except asyncio.TimeoutError:
            continue
        msg_id = frame.get("msg_id")
        if msg_id not in pending:
            continue
        conv, sent_at = pending.pop(msg_id)
        if frame["op"] == "ack":
            if killed_at and sent_at >= killed_at and conv not in first_ack_after:
                first_ack_after[conv] = time.monotonic() - killed_at
            await send(conv)
        else:  # an error: resend the same message
            await send(conv, msg_id)
    after = {n["name"] for n in call(a.node + "/v1/cluster")["nodes"] if n["state"] == "up"}
    lost = before - after
    moved = [c for c in convs if owner(c, sorted(before)) in lost]
    stayed = [c for c in convs if c not in moved]

    def summary(group):
        gaps = sorted(first_ack_after[c] * 1000 for c in group if c in first_ack_after)
        return {
            "conversations": len(group),
            "unanswered": len(group) - len(gaps),
            "first_ack_after_kill_ms_median": round(statistics.median(gaps), 1) if gaps else None,
            "first_ack_after_kill_ms_max": round(gaps[-1], 1) if gaps else None,
        }

    print(json.dumps({
        "killed": sorted(lost),
        "re_homed": summary(moved),
        "stayed": summary(stayed),
        "listed_down_after_ms": round((down_at - killed_at) * 1000, 1) if down_at else None,
    }))


asyncio.run(main())
