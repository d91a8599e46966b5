#!/usr/bin/env python3
"""An ordinary TCP client, run unmodified inside the simulated Pod's app container.

It knows nothing about ambassador: it connects to the address it is given with
the plain socket module, and reports what it saw so the tests can assert on it.
"""
import errno
import hashlib
import resource
import socket
import sys
import threading
import time


def addr_family(host, family):
    if family == "mapped":
        return socket.AF_INET6, "::ffff:" + host
    if ":" in host:
        return socket.AF_INET6, host
    return socket.AF_INET, host


def connect(host, port, family="auto", timeout=10):
    fam, h = addr_family(host, family)
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect((h, int(port)))
    return s


def readline(s):
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def fail(e, started):
    name = errno.errorcode.get(getattr(e, "errno", None) or 0, type(e).__name__)
    print(f"ERROR {name} after {time.monotonic() - started:.3f}s")
    sys.exit(1)


def main():
    mode, host, port = sys.argv[1], sys.argv[2], sys.argv[3]
    rest = sys.argv[4:]
    started = time.monotonic()
    if mode == "greet":
        family = rest[0] if rest else "auto"
        try:
            s = connect(host, port, family)
        except OSError as e:
            fail(e, started)
        peer = s.getpeername()
        greeting = readline(s)
        s.sendall(b"ping\n")
        echo = readline(s)
        print(f"PEER {peer[0]} {peer[1]}")
        print(f"GREETING {greeting}")
        print(f"ECHO {echo}")
    elif mode == "halfclose":
        s = connect(host, port)
        s.sendall(b"x" * int(rest[0]))
        s.shutdown(socket.SHUT_WR)
        print(f"REPLY {readline(s)}")
        print("EOF" if s.recv(1) == b"" else "MORE")
    elif mode == "readfirst":
        s = connect(host, port)
        got = readline(s)
        eof = s.recv(1) == b""
        s.sendall(b"after-fin")
        s.close()
        print(f"READ {got} EOF {eof}")
    elif mode == "rst":
        s = connect(host, port)
        s.sendall(b"x")
        time.sleep(0.2)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
        print("SENT RST")
    elif mode == "expect-rst":
        try:
            # On loopback the reset can land before connect() even returns.
            s = connect(host, port)
            s.sendall(b"x")
            data = s.recv(16)
            print("EOF" if data == b"" else f"DATA {data!r}")
        except (ConnectionResetError, BrokenPipeError):
            print("RESET")
    elif mode == "many":
        ports = [int(p) for p in port.split(",")]
        count, batch = int(rest[0]), int(rest[1])
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        held, ok, misrouted, failed = [], 0, 0, 0
        for start in range(0, count, batch):
            opened = []
            for i in range(start, min(start + batch, count)):
                want = ports[i % len(ports)]
                try:
                    opened.append((connect(host, want), want))
                except OSError:
                    failed += 1
            for s, want in opened:
                try:
                    greeting = readline(s)
                    got = int(greeting.split()[1].rsplit(":", 1)[1])
                    if got == want:
                        ok += 1
                    else:
                        misrouted += 1
                except (OSError, IndexError, ValueError):
                    failed += 1
                held.append(s)
        print(f"ok {ok} misrouted {misrouted} failed {failed} open {len(held)}")
    elif mode == "echo":
        # Each connection writes at once (no wait for the greeting), in
        # several writes, while a second thread reads the echo back: the
        # bytes must come back whole and in order.
        count, size = int(rest[0]), int(rest[1])
        ok = mismatched = 0
        for i in range(count):
            data = hashlib.sha256(str(i).encode()).digest() * (size // 32 + 1)
            data = data[:size]
            s = connect(host, port, timeout=30)
            got = bytearray()

            def read_all():
                buf = b""
                while not buf.endswith(b"\n"):
                    buf += s.recv(1)
                while len(got) < size:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got.extend(chunk)

            reader = threading.Thread(target=read_all)
            reader.start()
            if "sendfile" in rest[2:]:
                # sendfile(2): the kernel's splice path, not sendmsg.
                import tempfile
                with tempfile.TemporaryFile() as f:
                    f.write(data)
                    f.flush()
                    f.seek(0)
                    s.sendfile(f)
            else:
                step = max(1, size // 7)
                for at in range(0, size, step):
                    s.sendall(data[at:at + step])
            reader.join()
            s.close()
            if bytes(got) == data:
                ok += 1
            else:
                mismatched += 1
        print(f"ok {ok} mismatched {mismatched}")
    elif mode == "flood":
        # Writes without ever reading until a write has blocked for a second:
        # how much the path buffers for a peer that does not read.
        s = connect(host, port)
        s.settimeout(1.0)
        total, chunk = 0, b"x" * 65536
        limit = int(rest[0]) if rest else 1 << 30
        try:
            while total < limit:
                total += s.send(chunk)
        except (socket.timeout, TimeoutError):
            pass
        print(f"buffered {total}")
    elif mode == "tfo":
        # TCP Fast Open: the first bytes leave inside sendto (MSG_FASTOPEN),
        # more follow at once; the echo must come back whole and in order.
        fam, h = addr_family(host, "auto")
        s = socket.socket(fam, socket.SOCK_STREAM)
        first, rest_data = b"A" * 100, b"B" * 3000
        # Blocking (no timeout yet): the connect happens inside sendto.
        s.sendto(first, socket.MSG_FASTOPEN, (h, int(port)))
        s.sendall(rest_data)
        s.settimeout(3)
        # The greeting and the echo may arrive in one read: take the line
        # off the front of everything received.
        want = first + rest_data
        data = b""
        try:
            while b"\n" not in data or len(data.split(b"\n", 1)[1]) < len(want):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (socket.timeout, TimeoutError):
            print("timeout")
            return
        greeting, _, got = data.partition(b"\n")
        print("ok" if got == want else f"mismatch {got[:40]!r}", greeting.decode().split()[0])
    elif mode == "readfirst-stall":
        # Connects, reads nothing for a while, then closes.
        s = connect(host, port)
        time.sleep(3)
        s.close()
        print("closed")
    elif mode == "raw":
        # Bytes exactly as given (hex), then every status line that comes back.
        s = connect(host, port)
        s.sendall(bytes.fromhex(rest[0]))
        s.settimeout(2)
        data = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        for line in data.split(b"\r\n"):
            if line.startswith(b"HTTP/1."):
                print(line.decode())
        print("END")
    elif mode == "slow-head":
        # Starts a request head and never finishes it: how long until dropped?
        s = connect(host, port)
        s.sendall(b"GET / HTTP/1.1\r\nHost: slow\r\n")
        s.settimeout(30)
        try:
            data = s.recv(4096)
            what = data.split(b"\r\n")[0].decode() if data else "EOF"
        except ConnectionResetError:
            what = "RESET"
        print(f"{what} after {time.monotonic() - started:.1f}s")
    elif mode == "upgrade":
        s = connect(host, port)
        s.sendall(b"GET /chat HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
                  b"Connection: Upgrade\r\nUpgrade: echo-protocol\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(1)
            if not chunk:
                break
            head += chunk
        print(head.split(b"\r\n")[0].decode())
        s.sendall(b"ping over the upgraded connection\n")
        print("ECHO", readline(s))
    elif mode == "http-steady":
        # N GETs one after another, `gap` ms apart, on fresh connections: a
        # steady trickle of load.
        import http.client
        count, gap = int(rest[0]), int(rest[1]) / 1000
        by = {}
        for _ in range(count):
            c = http.client.HTTPConnection(host, int(port), timeout=20)
            try:
                c.request("GET", "/")
                r = c.getresponse()
                r.read()
                st = r.status
            except (OSError, http.client.HTTPException) as e:
                st = type(e).__name__
            by[st] = by.get(st, 0) + 1
            time.sleep(gap)
        print(" ".join(f"{k}x{v}" for k, v in sorted(by.items(), key=str)))
    elif mode == "http-many":
        # N concurrent plain HTTP GETs (one connection each), as a busy app would.
        import http.client
        count = int(rest[0])
        want_len = int(rest[1]) if len(rest) > 1 else None
        statuses = []
        lock = threading.Lock()

        def get():
            c = http.client.HTTPConnection(host, int(port), timeout=20)
            try:
                c.request("GET", "/")
                r = c.getresponse()
                body = r.read()
                st = r.status
                if want_len is not None and len(body) != want_len:
                    st = f"short{len(body)}"
            except (OSError, http.client.HTTPException) as e:
                st = type(e).__name__
            with lock:
                statuses.append(st)

        threads = [threading.Thread(target=get) for _ in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        by = {}
        for st in statuses:
            by[st] = by.get(st, 0) + 1
        print(" ".join(f"{k}x{v}" for k, v in sorted(by.items(), key=str)))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
