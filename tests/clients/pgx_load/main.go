// An app on pgx v4 (Debian's golang-github-jackc-pgx-v4-dev), run
// unmodified in the simulated Pod: pgx prepares every query as a named
// statement by default (its statement cache). CONNS connections at once, each
// ITERS rounds of two queries and a transaction, every result checked;
// prints "ok N" (results checked), or "error: ..." on stderr and exits 1.
//
//	pgx_load HOST CONNS ITERS
package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"sync"

	"github.com/jackc/pgx/v4"
)

func run(ctx context.Context, host string, n, iters int) (int, error) {
	conn, err := pgx.Connect(ctx, fmt.Sprintf("host=%s port=5432 user=app dbname=orders sslmode=disable", host))
	if err != nil {
		return 0, err
	}
	defer conn.Close(ctx)
	checked := 0
	for i := 0; i < iters; i++ {
		var got int
		if err := conn.QueryRow(ctx, "select $1::int + 1", i).Scan(&got); err != nil {
			return checked, err
		}
		if got != i+1 {
			return checked, fmt.Errorf("select $1::int + 1 with %d gave %d", i, got)
		}
		var s string
		err := conn.BeginFunc(ctx, func(tx pgx.Tx) error {
			return tx.QueryRow(ctx, "select $1::int::text || '-' || $2::int::text", n, i).Scan(&s)
		})
		if err != nil {
			return checked, err
		}
		if s != fmt.Sprintf("%d-%d", n, i) {
			return checked, fmt.Errorf("got %q", s)
		}
		checked += 2
	}
	return checked, nil
}

func main() {
	host := os.Args[1]
	conns, _ := strconv.Atoi(os.Args[2])
	iters, _ := strconv.Atoi(os.Args[3])
	ctx := context.Background()
	var wg sync.WaitGroup
	var mu sync.Mutex
	total := 0
	var first error
	for n := 0; n < conns; n++ {
		wg.Add(1)
		go func(n int) {
			defer wg.Done()
			c, err := run(ctx, host, n, iters)
			mu.Lock()
			defer mu.Unlock()
			total += c
			if err != nil && first == nil {
				first = err
			}
		}(n)
	}
	wg.Wait()
	if first != nil {
		fmt.Fprintf(os.Stderr, "error: %v\n", first)
		os.Exit(1)
	}
	fmt.Printf("ok %d\n", total)
}
