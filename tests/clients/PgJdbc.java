// An app on the PostgreSQL JDBC driver (Debian's libpostgresql-jdbc-java),
// run unmodified in the simulated Pod with the driver's defaults: a
// PreparedStatement becomes a named server-side statement on its fifth
// execution (prepareThreshold=5). CONNS connections on threads, each ITERS
// rounds of two statements and a transaction, every result checked; prints
// "ok N" (results checked), or "error: ..." on stderr and exits 1.
//
//   java -cp /usr/share/java/postgresql.jar PgJdbc.java HOST CONNS ITERS

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicReference;

public class PgJdbc {
    static int run(String host, int n, int iters) throws Exception {
        String url = "jdbc:postgresql://" + host + ":5432/orders?user=app&sslmode=disable";
        int checked = 0;
        try (Connection c = DriverManager.getConnection(url);
             PreparedStatement add = c.prepareStatement("select ?::int + 1");
             PreparedStatement cat = c.prepareStatement("select ?::text || '-' || ?::text")) {
            for (int i = 0; i < iters; i++) {
                add.setInt(1, i);
                try (ResultSet r = add.executeQuery()) {
                    r.next();
                    if (r.getInt(1) != i + 1) throw new IllegalStateException("add " + i + " gave " + r.getInt(1));
                }
                c.setAutoCommit(false);
                cat.setInt(1, n);
                cat.setInt(2, i);
                try (ResultSet r = cat.executeQuery()) {
                    r.next();
                    String want = n + "-" + i;
                    if (!want.equals(r.getString(1))) throw new IllegalStateException("got " + r.getString(1));
                }
                c.commit();
                c.setAutoCommit(true);
                checked += 2;
            }
        }
        return checked;
    }

    public static void main(String[] args) throws Exception {
        String host = args[0];
        int conns = Integer.parseInt(args[1]);
        int iters = Integer.parseInt(args[2]);
        AtomicInteger total = new AtomicInteger();
        AtomicReference<Exception> first = new AtomicReference<>();
        List<Thread> threads = new ArrayList<>();
        for (int n = 0; n < conns; n++) {
            final int k = n;
            Thread t = new Thread(() -> {
                try {
                    total.addAndGet(run(host, k, iters));
                } catch (Exception e) {
                    first.compareAndSet(null, e);
                }
            });
            t.start();
            threads.add(t);
        }
        for (Thread t : threads) t.join();
        if (first.get() != null) {
            System.err.println("error: " + first.get());
            System.exit(1);
        }
        System.out.println("ok " + total.get());
    }
}
