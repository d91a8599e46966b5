#!/usr/bin/env python3
"""Drivers that prepare statements, as apps use them, run unmodified in the
simulated Pod (Debian's python3-asyncpg and python3-psycopg). Each checks
every result it gets and prints `ok N` (N results checked); an error prints
`error: <class>: <message>` on stderr and exits 1.

  pg_drivers.py asyncpg HOST CONNS ITERS
      CONNS asyncpg connections at once (asyncpg prepares every query as a
      named statement), each ITERS rounds of: a fetchval through the
      statement cache, a statement from prepare() reused, and a transaction
      with executemany and a read back.
  pg_drivers.py psycopg HOST CONNS ITERS
      CONNS psycopg 3 connections on threads with the default
      prepare_threshold (a query is prepared on its sixth execution) and a
      cache of two statements, ITERS executions of three queries each (so
      psycopg deallocates by name), a rollback halfway (after which it
      deallocates all).
  pg_drivers.py distinct HOST K ITERS
      one psycopg connection preparing K distinct statements (threshold 0)
      and cycling through them ITERS times.
  pg_drivers.py sql-prepare HOST
      SQL PREPARE, which transaction pooling refuses.
"""
import asyncio
import sys
import threading

import psycopg


def dsn(host):
    return f"host={host} port=5432 user=app dbname=orders connect_timeout=10"


async def asyncpg_conn(host, n, iters):
    import asyncpg

    conn = await asyncpg.connect(host=host, port=5432, user="app", database="orders", ssl=False)
    checked = 0
    try:
        stmt = await conn.prepare("select $1::int * 2 + $2::int")
        for i in range(iters):
            assert await conn.fetchval("select $1::int + 1", i) == i + 1
            assert await stmt.fetchval(i, n) == i * 2 + n
            async with conn.transaction():
                await conn.executemany(
                    "insert into t (conn, i) values ($1, $2)", [(n, i), (n, -i)]
                )
                got = await conn.fetchval("select count(*) from t where conn = $1 and abs(i) = $2", n, i)
                assert got == 2, got
            checked += 3
    finally:
        await conn.close()
    return checked


async def asyncpg_load(host, conns, iters):
    import asyncpg

    setup = await asyncpg.connect(host=host, port=5432, user="app", database="orders", ssl=False)
    await setup.execute("drop table if exists t; create table t (conn int, i int)")
    await setup.close()
    results = await asyncio.gather(*(asyncpg_conn(host, n, iters) for n in range(conns)))
    return sum(results)


def psycopg_conn(host, n, iters, out, errors):
    try:
        with psycopg.connect(dsn(host), autocommit=True) as conn:
            # Three queries through a cache of two: psycopg sends
            # `DEALLOCATE _pg3_N` as it rotates, and `DEALLOCATE ALL` after
            # a rollback.
            conn.prepared_max = 2
            checked = 0
            for i in range(iters):
                if i == iters // 2:
                    with conn.transaction(force_rollback=True):
                        conn.execute("select 1")
                assert conn.execute("select %s::int + 1", [i]).fetchone()[0] == i + 1
                assert conn.execute("select %s::int + 2", [i]).fetchone()[0] == i + 2
                with conn.transaction():
                    row = conn.execute("select %s::text || '-' || %s::text", [n, i]).fetchone()
                    assert row[0] == f"{n}-{i}", row
                checked += 3
            out.append(checked)
    except Exception as e:  # reported by the main thread
        errors.append(e)


def psycopg_load(host, conns, iters):
    out, errors = [], []
    threads = [
        threading.Thread(target=psycopg_conn, args=(host, n, iters, out, errors))
        for n in range(conns)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(out)


def distinct(host, k, iters):
    with psycopg.connect(dsn(host), autocommit=True, prepare_threshold=0) as conn:
        checked = 0
        for _ in range(iters):
            for j in range(k):
                got = conn.execute(f"select %s::int + {j}", [j]).fetchone()[0]
                assert got == 2 * j, got
                checked += 1
        return checked


def main():
    cmd, host = sys.argv[1], sys.argv[2]
    try:
        if cmd == "asyncpg":
            n = asyncio.run(asyncpg_load(host, int(sys.argv[3]), int(sys.argv[4])))
        elif cmd == "psycopg":
            n = psycopg_load(host, int(sys.argv[3]), int(sys.argv[4]))
        elif cmd == "distinct":
            n = distinct(host, int(sys.argv[3]), int(sys.argv[4]))
        elif cmd == "sql-prepare":
            with psycopg.connect(dsn(host), autocommit=True) as conn:
                conn.execute("PREPARE p AS select 1")
            n = 0
        else:
            raise SystemExit(f"unknown command {cmd}")
    except Exception as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"ok {n}")


if __name__ == "__main__":
    main()
