#!/usr/bin/env python3
"""A hostile app, run unmodified inside the simulated Pod's app container.

It speaks to whatever address it is given with the plain socket and ssl
modules, sending exactly the bytes it is told to, and reports what came back,
so the tests can assert on it. Modes:

  raw HOST PORT HEX [WAIT]     send the bytes (or @FILE's), print each response's status
                               line and x-ambassador-error, any other bytes
                               (DATA), then how the connection ended: EOF,
                               RESET or OPEN; or CONNECT <errno>
  tls HOST PORT SNI            a TLS handshake naming SNI (no verification):
                               HANDSHAKE ok, or how it failed
  hold HOST PORT N SECS HEX    N connections each send the bytes, then wait up
                               to SECS: print how many the other side closed,
                               and when the last closed
  h2 HOST PORT AUTHORITY SECS  HTTP/2 prior knowledge, hand-framed: one GET,
                               then silence (SETTINGS and PINGs
                               acknowledged, as any client does); print the response status and
                               when the other side closed: CLOSED AFTER s,
                               or OPEN after SECS
  rate HOST PORT SECS RPS      GET / on a new connection RPS times a second
                               for SECS: print REQUESTS n ERRORS e MAX ms
  pgbig HOST PORT USER DB DECLARED SEND
                               a PostgreSQL session (startup, then up to
                               ReadyForQuery), then a Query declared DECLARED
                               bytes long of which SEND are sent: SENT, then
                               3 s before closing
  echo HOST PORT SECS RPS      a new connection RPS times a second for SECS:
                               read the greeting line, send a line, read its
                               echo; print CONNS n ERRORS e MAX ms
  loop HOST PORT FILE          forever: connect every 50 ms, append
                               "<CLOCK_MONOTONIC> OK" or "... ERR <errno>" to
                               FILE (first line: "PID <pid>")
"""
import errno
import os
import socket
import ssl
import sys
import time


def connect(host, port, timeout=10):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect((host, int(port)))
    return s


def read_all(s, wait):
    """Reads until EOF, a reset, or `wait` seconds of silence."""
    data = b""
    s.settimeout(wait)
    while True:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            return data, "OPEN"
        except ConnectionResetError:
            return data, "RESET"
        if not chunk:
            return data, "EOF"
        data += chunk


def report_http(data):
    """One STATUS (and REASON) per response, framed by its Content-Length
    or chunked coding, as a client would read them one after the other."""
    while data.startswith(b"HTTP/"):
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            print("PARTIAL " + head[:60].decode(errors="replace"))
            return
        lines = head.split(b"\r\n")
        status = lines[0].split(b" ")[1].decode(errors="replace")
        print("STATUS " + status)
        length, chunked = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip()
            if name == b"x-ambassador-error":
                print("REASON " + value.decode(errors="replace"))
            elif name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                chunked = True
        if status.startswith("1"):
            data = rest
            continue
        if chunked:
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0] or b"0", 16)
                body, rest = body + rest[:size], rest[size + 2:]
                if size == 0:
                    break
        else:
            body, rest = rest[:length], rest[length:]
        if body:
            print("BODY " + body[:80].decode(errors="replace").strip())
        data = rest


def raw(host, port, hexbytes, wait="2"):
    try:
        s = connect(host, port)
    except OSError as e:
        print("CONNECT " + errno.errorcode.get(e.errno or 0, type(e).__name__))
        return
    payload = open(hexbytes[1:], "rb").read() if hexbytes.startswith("@") else bytes.fromhex(hexbytes)
    try:
        s.sendall(payload)
    except (ConnectionResetError, BrokenPipeError):
        print("END RESET")
        return
    data, end = read_all(s, float(wait))
    if data.startswith(b"HTTP/"):
        report_http(data)
    elif data:
        print("DATA " + data[:64].decode(errors="replace").strip())
    print("END " + end)


def tls(host, port, sni):
    s = connect(host, port)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        t = ctx.wrap_socket(s, server_hostname=sni)
        t.sendall(b"GET / HTTP/1.0\r\n\r\n")
        print("HANDSHAKE ok")
    except ConnectionResetError:
        print("HANDSHAKE RESET")
    except (ssl.SSLError, OSError) as e:
        print("HANDSHAKE " + type(e).__name__)


def hold(host, port, n, secs, hexbytes):
    import resource
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    payload = bytes.fromhex(hexbytes)
    conns = []
    refused = 0
    for _ in range(int(n)):
        try:
            s = connect(host, port)
            if payload:
                s.sendall(payload)
        except OSError:
            # Refused (or reset) at once: closed as far as holding goes.
            refused += 1
            continue
        s.setblocking(False)
        conns.append(s)
    print("HELD", flush=True)
    started = time.monotonic()
    deadline = started + float(secs)
    open_ = set(range(len(conns)))
    last = 0.0
    while open_ and time.monotonic() < deadline:
        for i in list(open_):
            try:
                if conns[i].recv(65536) == b"":
                    open_.discard(i)
                    last = time.monotonic() - started
            except BlockingIOError:
                pass
            except OSError:
                open_.discard(i)
                last = time.monotonic() - started
        time.sleep(0.05)
    total = len(conns) + refused
    print(f"CLOSED {total - len(open_)} OF {total} LAST {last:.1f}")


def frame(kind, flags, stream, payload=b""):
    n = len(payload)
    return bytes([n >> 16, (n >> 8) & 255, n & 255, kind, flags]) + stream.to_bytes(4, "big") + payload


def h2(host, port, authority, secs):
    s = connect(host, port)
    a = authority.encode()
    # HPACK: :method GET, :scheme http, :path /, :authority literal (no Huffman).
    block = bytes([0x82, 0x86, 0x84, 0x41, len(a)]) + a
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0) + frame(1, 0x5, 1, block))
    started = time.monotonic()
    deadline = started + float(secs)
    buf = b""
    while time.monotonic() < deadline:
        s.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            print(f"CLOSED AFTER {time.monotonic() - started:.1f} RESET")
            return
        if not chunk:
            print(f"CLOSED AFTER {time.monotonic() - started:.1f}")
            return
        buf += chunk
        while len(buf) >= 9:
            n = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + n:
                break
            kind, flags, payload = buf[3], buf[4], buf[9:9 + n]
            buf = buf[9 + n:]
            if kind == 4 and not flags & 1:
                s.sendall(frame(4, 1, 0))
            elif kind == 6 and not flags & 1:
                s.sendall(frame(6, 1, 0, payload))
            elif kind == 1:
                # The first header of a response: :status, indexed (0x88 200...).
                status = {0x88: 200, 0x89: 204, 0x8a: 206, 0x8b: 304, 0x8c: 400, 0x8d: 404, 0x8e: 500}
                print(f"STATUS {status.get(payload[0], 'other')}")
            elif kind == 7:
                print("GOAWAY")
    print("OPEN")


def rate(host, port, secs, rps):
    import http.client
    every = 1.0 / float(rps)
    started = time.monotonic()
    n = errors = 0
    worst = 0.0
    while time.monotonic() - started < float(secs):
        t = time.monotonic()
        try:
            c = http.client.HTTPConnection(host, int(port), timeout=10)
            c.request("GET", "/")
            r = c.getresponse()
            r.read()
            c.close()
            if r.status != 200:
                errors += 1
        except OSError:
            errors += 1
        took = time.monotonic() - t
        worst = max(worst, took)
        n += 1
        time.sleep(max(0.0, every - took))
    print(f"REQUESTS {n} ERRORS {errors} MAX {worst * 1000:.0f}")


def pgbig(host, port, user, db, declared, send):
    import struct
    s = connect(host, port)
    params = b"user\0" + user.encode() + b"\0database\0" + db.encode() + b"\0\0"
    s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
    buf, ready = b"", False
    while not ready:
        chunk = s.recv(65536)
        if not chunk:
            print("CLOSED before ReadyForQuery")
            return
        buf += chunk
        while len(buf) >= 5 and not ready:
            tag, n = buf[0:1], struct.unpack("!i", buf[1:5])[0]
            if len(buf) < 1 + n:
                break
            if tag == b"E":
                print("ERROR " + buf[5:1 + n].decode(errors="replace"))
                return
            buf, ready = buf[1 + n:], tag == b"Z"
    s.sendall(b"Q" + struct.pack("!i", int(declared) + 4))
    chunk = b"x" * 65536
    left = int(send)
    while left > 0:
        s.sendall(chunk[:left])
        left -= len(chunk[:left])
    print("SENT", flush=True)
    time.sleep(3)


def echo(host, port, secs, rps):
    every = 1.0 / float(rps)
    started = time.monotonic()
    n = errors = 0
    worst = 0.0
    while time.monotonic() - started < float(secs):
        t = time.monotonic()
        try:
            s = connect(host, port)
            f = s.makefile("rwb")
            f.readline()
            f.write(b"soak\n")
            f.flush()
            if f.readline().strip() != b"soak":
                errors += 1
            s.close()
        except OSError:
            errors += 1
        took = time.monotonic() - t
        worst = max(worst, took)
        n += 1
        time.sleep(max(0.0, every - took))
    print(f"CONNS {n} ERRORS {errors} MAX {worst * 1000:.0f}")


def loop(host, port, path):
    with open(path, "a", buffering=1) as out:
        out.write(f"PID {os.getpid()}\n")
        while True:
            try:
                s = connect(host, port, timeout=1)
                s.close()
                what = "OK"
            except OSError as e:
                what = "ERR " + errno.errorcode.get(e.errno or 0, type(e).__name__)
            out.write(f"{time.clock_gettime(time.CLOCK_MONOTONIC):.3f} {what}\n")
            time.sleep(0.05)


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    {"raw": raw, "tls": tls, "hold": hold, "loop": loop, "h2": h2, "rate": rate, "pgbig": pgbig, "echo": echo}[mode](*args)


if __name__ == "__main__":
    main()
