#!/usr/bin/env python3
"""Write the hand-made seeds in fuzz/seeds/<target>/ (docs/fuzzing.md): valid inputs of every kind each
target reads, from docs/protocol.md and the example config. Run from fuzz/: python3 seeds/make-seeds.py.
The files are committed; this script is how they were made."""
import os
import struct
import zlib


def w(target, name, data):
    d = f'seeds/{target}'
    os.makedirs(d, exist_ok=True)
    with open(f'{d}/{name}', 'wb') as f:
        f.write(data if isinstance(data, bytes) else data.encode())


# client_frame: the body limit (u16 LE, 4096) + a frame of each op.
LIMIT = struct.pack('<H', 4096)
FRAMES = {
    'send': '{"op":"send","msg_id":"m-7f3a-0001","conv":"c_019ab6f2a1c47d3e8f2b5a6c7d8e9f01","body":"hello"}',
    'sync': '{"op":"sync","conv":"c_019ab6f2a1c47d3e8f2b5a6c7d8e9f01","after_seq":41}',
    'ping': '{"op":"ping"}',
    'typing': '{"op":"typing","conv":"c_1"}',
    'delivered': '{"op":"delivered","conv":"c_1","seq":42}',
    'read': '{"op":"read","conv":"c_1","seq":42}',
    'presence_subscribe': '{"op":"presence_subscribe","users":["bob","carol","bob"]}',
    'send_unicode': '{"op":"send","msg_id":"m\\u00e9","conv":"c","body":"日本語 \\ud83d\\ude00"}',
    'unknown_op': '{"op":"dance","msg_id":"x"}',
}
for name, text in FRAMES.items():
    w('client_frame', name, LIMIT + text.encode())
w('client_frame', 'send_over_limit', struct.pack('<H', 4) + FRAMES['send'].encode())

# rest_bodies: the pick byte (its value mod 5 is the body, its high nibble the caller) + the body.
REST = {
    'create_group': (0, '{"kind":"group","name":"ops","members":["bob","carol"]}'),
    'create_dm': (0x14, '{"kind":"dm","members":["bob"]}'),
    'send': (1, '{"msg_id":"m-1","body":"hello"}'),
    'add_member': (2, '{"user":"dave"}'),
    'dev_token': (3, '{"user":"alice"}'),
    'presence': (4, 'users=bob,carol,,dave'),
}
for name, (pick, body) in REST.items():
    w('rest_bodies', name, bytes([pick]) + body.encode())


# ws_reader: the frame limit (u16 LE), the piece seed, then masked client frames.
def frame(op, payload, fin=True, mask=b'\x37\xfa\x21\x3d'):
    n = len(payload)
    b0 = (0x80 if fin else 0) | op
    if n < 126:
        head = bytes([b0, 0x80 | n])
    elif n < 65536:
        head = bytes([b0, 0x80 | 126]) + struct.pack('>H', n)
    else:
        head = bytes([b0, 0x80 | 127]) + struct.pack('>Q', n)
    return head + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload))


WS = struct.pack('<H', 65535) + b'\x05'
TEXT = 'héllo wör'.encode()
w('ws_reader', 'text', WS + frame(1, FRAMES['send'].encode()))
w('ws_reader', 'fragmented_utf8',
  WS + frame(1, TEXT[:2], fin=False) + frame(0, TEXT[2:8], fin=False) + frame(0, TEXT[8:]))
w('ws_reader', 'ping_pong_close',
  WS + frame(9, b'hi') + frame(10, b'') + frame(1, b'{"op":"ping"}')
  + frame(8, struct.pack('>H', 1000) + b'bye'))
w('ws_reader', 'binary_then_close_empty', WS + frame(2, b'\x00\x01') + frame(8, b''))
w('ws_reader', 'interleaved_ping',
  WS + frame(1, b'{"op":', fin=False) + frame(9, b'p') + frame(0, b'"ping"}'))
w('ws_reader', 'medium_text', WS + frame(1, b'x' * 300))
w('ws_reader', 'length_2_63', WS + bytes([0x81, 0xff]) + struct.pack('>Q', 1 << 63))
w('ws_reader', 'small_limit', struct.pack('<H', 16) + b'\x09' + frame(1, b'x' * 20))

# config: the example file, and one with most settings set.
with open('../switchboard.example.toml') as f:
    w('config', 'example.toml', f.read())
w('config', 'cluster.toml', '''listen = "0.0.0.0:8080"
data_dir = "/var/lib/switchboard"
store = "cassandra://127.0.0.1:9042,127.0.0.2:9042/switchboard?rf=3&dc=dc1&consistency=local_quorum&timeout_ms=5000"
jwt_algorithm = "RS256"
jwt_public_key = "/etc/switchboard/jwt.pem"
jwt_issuer = "https://auth.example.com"
jwt_audience = "switchboard"
max_body_bytes = 8192
max_frame_bytes = 131072
max_connections_per_ip = 50
handshakes_per_ip_per_sec = 20
messages_per_user_per_sec = 5
messages_burst = 20
allowed_origins = ["https://chat.example.com", "http://localhost:3000"]
heartbeat_timeout_secs = 45.5
drain_window_secs = 0.0
presence_grace_secs = 0
node_name = "node-1.eu"
cluster_listen = "10.0.0.1:7000"
seeds = ["10.0.0.2:7000", "10.0.0.3:7000"]
cookie = "s3cret"
redis = "redis://127.0.0.1:6379/0"
cluster_tls_cert = "/etc/switchboard/node.pem"
cluster_tls_key = "/etc/switchboard/node.key"
cluster_tls_ca = "/etc/switchboard/ca.pem"
push_webhook = "https://push.example.com/notify"
hook_url = "http://127.0.0.1:9000/hook"
hook_timeout_ms = 250
''')


# log_segment: postcard LogRecords framed as Wal::append frames them (length, crc32, payload).
def varint(n):
    out = b''
    while True:
        low, n = n & 0x7f, n >> 7
        if not n:
            return out + bytes([low])
        out += bytes([low | 0x80])


def string(s):
    s = s.encode()
    return varint(len(s)) + s


def message(conv, seq, id_, msg_id, sender, body, ts):
    return (string(conv) + varint(seq) + string(id_) + string(msg_id) + string(sender) + string(body)
            + varint(ts))


def record(lsn, messages):
    return varint(lsn) + varint(len(messages)) + b''.join(messages)


def framed(payload):
    length = struct.pack('<I', len(payload))
    return length + struct.pack('<I', zlib.crc32(length + payload)) + payload


R1 = record(1, [message('c_1', 1, '019ab6f3b2d57a1c9e4f0b2d3c4e5f6a', 'm-1', 'alice', 'hello', 1764000000123)])
R2 = record(2, [message('c_1', 2, '019ab6f3b2d57a1c9e4f0b2d3c4e5f6b', 'm-2', 'bob', 'hi 日本', 1764000000200),
                message('c_2', 7, 'i', 'm-3', 'carol', '', 1764000000201)])
R3 = record(3, [])
SEGMENT = framed(R1) + framed(R2) + framed(R3)
w('log_segment', 'three_records', SEGMENT)
w('log_segment', 'torn_tail', SEGMENT + framed(R1)[:11])
w('log_segment', 'preallocated', SEGMENT + bytes(64))
