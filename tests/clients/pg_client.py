#!/usr/bin/env python3
"""An ordinary PostgreSQL app (psycopg 3, Debian's python3-psycopg), run
unmodified in the simulated Pod: it connects where it is told, with no
password and no TLS settings, and prints what it got.

  pg_client.py query DSN SQL[;SQL]  the last statement's rows, one per line,
                                    columns joined by |
  pg_client.py prepared DSN N       `select $1::int + 1` for 1..N, server-side
                                    prepared (protocol-level named statement)
Errors: `error: <class>: <message>` on stderr, exit 1.
"""
import sys

import psycopg


def main():
    cmd, dsn = sys.argv[1], sys.argv[2]
    try:
        with psycopg.connect(dsn, connect_timeout=10, autocommit=True) as conn:
            if cmd == "query":
                # One statement per execute (the extended protocol takes one).
                for sql in [q for q in sys.argv[3].split(";") if q.strip()]:
                    cur = conn.execute(sql)
                rows = cur.fetchall() if cur.description else []
                for row in rows:
                    print("|".join(str(v) for v in row))
            elif cmd == "prepared":
                out = []
                for i in range(1, int(sys.argv[3]) + 1):
                    out.append(conn.execute("select %s::int + 1", [i], prepare=True).fetchone()[0])
                print(" ".join(str(v) for v in out))
            else:
                raise SystemExit(f"unknown command {cmd}")
    except psycopg.Error as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
