"""Scenarios run through the proxy with an independent client: mysql-connector-python
(pure Python, `use_pure=True`), which speaks the protocol its own way (binary protocol for
prepared statements, its own capability flags, COM_SET_OPTION).

Usage: python3 clients.py SCENARIO PORT SCHEMA
Prints one JSON object on stdout; the Rust test (proxy/tests/clients.rs) asserts on it.
Every scenario is bounded: a fixed number of statements, connection and read timeouts.
"""

import json
import sys
import threading

import mysql.connector
from mysql.connector.constants import ClientFlag


def connect(port, db=None, flags=None, **kw):
    args = dict(
        host="127.0.0.1",
        port=port,
        user="app",
        password="app",
        use_pure=True,
        connection_timeout=20,
        autocommit=True,
    )
    if db:
        args["database"] = db
    if flags:
        args["client_flags"] = flags
    args.update(kw)
    return mysql.connector.connect(**args)


def run_threads(n, fn):
    errors = []

    def wrap(i):
        try:
            fn(i)
        except Exception as e:  # reported, never swallowed
            errors.append(f"thread {i}: {type(e).__name__}: {e}")

    ts = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    return errors


def ps_contexts(port, schema):
    """The same prepared statement text in different contexts: schemas a and b (tables with
    different rows), and sql_mode ANSI_QUOTES (where "v" is a column) against the default
    (where "v" is a string). Each client must always read its own context's answer."""
    wrong = []
    counts = {"executions": 0}
    lock = threading.Lock()
    contexts = [
        (f"{schema}_a", None, "SELECT v FROM t WHERE id = ?", "a"),
        (f"{schema}_b", None, "SELECT v FROM t WHERE id = ?", "b"),
        (f"{schema}_a", "ANSI_QUOTES", 'SELECT "v" FROM t WHERE id = ?', "a"),
        (f"{schema}_a", "", 'SELECT "v" FROM t WHERE id = ?', "v"),
    ]

    def client(i):
        db, mode, sql, want = contexts[i % len(contexts)]
        c = connect(port, db)
        if mode is not None:
            c.cmd_query(f"SET sql_mode = '{mode}'")
        cur = c.cursor(prepared=True)
        for _ in range(30):
            cur.execute(sql, (1,))
            rows = cur.fetchall()
            got = rows[0][0] if rows else None
            if isinstance(got, (bytes, bytearray)):
                got = got.decode()
            with lock:
                counts["executions"] += 1
                if got != want:
                    wrong.append(f"{db} sql_mode={mode!r}: {sql} gave {got!r}, want {want!r}")
        cur.close()
        c.close()

    errors = run_threads(8, client)
    return {"executions": counts["executions"], "wrong": wrong[:10], "wrong_count": len(wrong), "errors": errors}


def last_statement_info(port, schema):
    """LAST_INSERT_ID() inside statements, ROW_COUNT(), FOUND_ROWS(), SHOW WARNINGS and
    @@warning_count, while other clients keep the pool's connections moving."""
    problems = []
    lock = threading.Lock()

    def note(msg):
        with lock:
            problems.append(msg)

    def expect_row(cur, sql, want, what):
        """Run a one-row query; note it when the row (its value, for one column) is not `want`."""
        cur.execute(sql)
        row = tuple(cur.fetchone())
        got = row[0] if len(row) == 1 else row
        if got != want:
            note(f"{what} = {got}")

    def parent_child(i):
        c = connect(port, schema)
        cur = c.cursor()
        for j in range(40):
            cur.execute("INSERT INTO parent (name) VALUES (%s)", (f"t{i}-{j}",))
            cur.execute("INSERT INTO child (parent_id, tag) VALUES (LAST_INSERT_ID(), %s)", (f"t{i}-{j}",))
            # Inside an expression and in a read (routed to a replica).
            cur.execute("SELECT LAST_INSERT_ID() + 0 AS v")
            (v,) = cur.fetchone()
            if v != cur.lastrowid and cur.lastrowid not in (None, 0):
                note(f"thread {i}: LAST_INSERT_ID()+0 = {v}, client's lastrowid {cur.lastrowid}")
        c.close()

    def diagnostics(i):
        c = connect(port, schema)
        cur = c.cursor()
        cur.execute("SET sql_mode = ''")  # truncation is a warning, not an error
        for j in range(20):
            cur.execute("UPDATE parent SET name = name WHERE id < 0")
            cur.execute("INSERT INTO parent (name) VALUES ('d1'), ('d2'), ('d3')")
            expect_row(cur, "SELECT ROW_COUNT()", 3, f"diag {j}: ROW_COUNT() after a 3-row INSERT")
            cur.execute("INSERT INTO parent (name) VALUES (REPEAT('z', 300))")
            cur.execute("SHOW WARNINGS")
            w = cur.fetchall()
            if not any(r[1] == 1265 for r in w):
                note(f"diag {j}: SHOW WARNINGS after a truncating INSERT = {w}")
            cur.execute("INSERT INTO parent (name) VALUES (REPEAT('y', 300))")
            expect_row(cur, "SELECT @@warning_count", 1, f"diag {j}: @@warning_count after a truncating INSERT")
            # A statement that reads a table and has no warnings empties the list (MySQL
            # and MariaDB; MariaDB keeps it across statements that use no table).
            cur.execute("SELECT id FROM parent LIMIT 1")
            cur.fetchall()
            cur.execute("SHOW WARNINGS")
            w = cur.fetchall()
            if w:
                note(f"diag {j}: SHOW WARNINGS after a clean SELECT = {w}")
            expect_row(cur, "SELECT @@warning_count, ROW_COUNT()", (0, -1), f"diag {j}: @@warning_count, ROW_COUNT() after a clean SELECT")
            # (A table every replica has whole, however far behind it is.)
            cur.execute("SELECT SQL_CALC_FOUND_ROWS table_name FROM information_schema.tables LIMIT 1")
            cur.fetchall()
            expect_row(cur, "SELECT FOUND_ROWS() > 1", 1, f"diag {j}: FOUND_ROWS() > 1 after SQL_CALC_FOUND_ROWS")
        # GET DIAGNOSTICS reads the previous statement's diagnostics area: none after a
        # clean read, one condition (1265) after a truncating INSERT. (It sets user
        # variables, so the client stays on its connection afterwards: checked last.)
        cur.execute("SELECT id FROM parent LIMIT 1")
        cur.fetchall()
        cur.execute("GET DIAGNOSTICS @n = NUMBER")
        expect_row(cur, "SELECT @n", 0, "GET DIAGNOSTICS after a clean read: NUMBER")
        cur.execute("INSERT INTO parent (name) VALUES (REPEAT('x', 300))")
        cur.execute("GET DIAGNOSTICS @n = NUMBER")
        cur.execute("GET DIAGNOSTICS CONDITION 1 @errno = MYSQL_ERRNO")
        expect_row(cur, "SELECT @n, @errno", (1, 1265), "GET DIAGNOSTICS after a truncating INSERT: NUMBER, MYSQL_ERRNO")
        # Pinned (in a transaction): the diagnostics are the connection's own.
        cur.execute("BEGIN")
        cur.execute("INSERT INTO parent (name) VALUES (REPEAT('w', 300))")
        cur.execute("SHOW WARNINGS")
        w = cur.fetchall()
        if not any(r[1] == 1265 for r in w):
            note(f"SHOW WARNINGS in a transaction after a truncating INSERT = {w}")
        expect_row(cur, "SELECT @@warning_count", 1, "@@warning_count in a transaction after a truncating INSERT")
        cur.execute("COMMIT")
        c.close()

    errors = run_threads(8, lambda i: diagnostics(i) if i == 0 else parent_child(i))
    c = connect(port, schema)
    cur = c.cursor()
    # On the writer (FOR UPDATE): replicas may still be applying.
    cur.execute("SELECT COUNT(*) FROM child FOR UPDATE")
    (children,) = cur.fetchone()
    cur.execute("SELECT COUNT(*) FROM child JOIN parent ON parent.id = child.parent_id AND parent.name = child.tag FOR UPDATE")
    (matched,) = cur.fetchone()
    c.close()
    return {"children": children, "matched": matched, "problems": problems[:10], "problem_count": len(problems), "errors": errors}


def multi_statements(port, schema):
    """Multi-statements only as the client's capabilities and COM_SET_OPTION allow. The same
    steps run against the server directly give the reference answers."""

    def attempt(cur, multi):
        """The statements' values, or the error number."""
        try:
            if multi:
                got = []
                for r in cur.execute("SELECT 1; SELECT 2", multi=True):
                    got.extend(x[0] for x in r.fetchall())
                return got
            cur.execute("SELECT 1; SELECT 2")
            cur.fetchall()
            return "ok"
        except mysql.connector.Error as e:
            return e.errno

    def steps(p):
        out = {}
        c = connect(p, schema, flags=[-ClientFlag.MULTI_STATEMENTS])
        out["without_flag"] = attempt(c.cursor(), False)
        c.close()
        # COM_SET_OPTION MYSQL_OPTION_MULTI_STATEMENTS_ON (0) on a connection without the flag.
        c = connect(p, schema, flags=[-ClientFlag.MULTI_STATEMENTS])
        c._send_cmd(0x1B, (0).to_bytes(2, "little"))
        cur = c.cursor()
        out["after_set_option_on"] = attempt(cur, True)
        # ... and OFF (1) again.
        c._send_cmd(0x1B, (1).to_bytes(2, "little"))
        out["after_set_option_off"] = attempt(cur, False)
        c.close()
        c = connect(p, schema)
        out["with_flag"] = attempt(c.cursor(), True)
        c.close()
        return out

    return {"proxy": steps(port), "direct": steps(3307)}


def session_state(port, schema):
    """State the proxy cannot follow keeps the client on its connection, and never reaches
    another client: a procedure that SETs sql_mode, a multi-statement that fails after a SET."""
    out = {"problems": []}

    def note(msg):
        out["problems"].append(msg)

    def others_clean(tag):
        # Other clients never inherit the state (their connections are reset or fresh).
        for _ in range(6):
            o = connect(port, schema)
            cur = o.cursor()
            cur.execute("SELECT @@sql_mode, @@time_zone")
            (mode, tz) = cur.fetchone()
            if "ANSI_QUOTES" in mode or tz == "+05:00":
                note(f"{tag}: another client got sql_mode {mode}, time_zone {tz}")
            o.close()

    # (A routine restores sql_mode when it returns; time_zone it does not.)
    c = connect(port, schema)
    cur = c.cursor()
    cur.callproc("set_tz")
    for _ in range(10):
        cur.execute("SELECT @@time_zone")
        (tz,) = cur.fetchone()
        if tz != "+05:00":
            note(f"after CALL: time_zone {tz}")
    others_clean("CALL")
    c.close()

    c = connect(port, schema)
    cur = c.cursor()
    try:
        for _ in cur.execute("SET sql_mode = 'ANSI_QUOTES'; SELECT * FROM no_such_table", multi=True):
            pass
        note("the failing multi-statement did not fail")
    except mysql.connector.Error as e:
        out["multi_error"] = e.errno
    for _ in range(10):
        cur.execute("SELECT @@sql_mode")
        (mode,) = cur.fetchone()
        if "ANSI_QUOTES" not in mode:
            note(f"after a failed multi-statement: sql_mode {mode}")
    others_clean("multi")
    c.close()
    return out


def change_user(port, schema):
    """COM_CHANGE_USER (cmd_change_user): the session becomes the new user's, in place; the
    old user's session state is gone; reads and writes run as the new account."""
    out = {"problems": []}
    c = connect(port, schema)
    cur = c.cursor()
    cur.execute("SELECT CONNECTION_ID()")
    (before,) = cur.fetchone()
    cur.execute("SET @v = 42")
    cur.execute("SET time_zone = '+03:00'")
    cur.close()
    c.cmd_change_user(username="bw_cu_py", password="cu", database=schema)
    cur = c.cursor()
    cur.execute("SELECT CONNECTION_ID()")
    (after,) = cur.fetchone()
    if after != before:
        out["problems"].append(f"connection id {before} -> {after}")
    for sql in ["SELECT CURRENT_USER()", "SELECT CURRENT_USER() FROM DUAL FOR UPDATE"]:
        for _ in range(5):
            cur.execute(sql)
            (u,) = cur.fetchone()
            if u != "bw_cu_py@%":
                out["problems"].append(f"{sql}: {u}")
    cur.execute("SELECT @v, @@time_zone")
    (v, tz) = cur.fetchone()
    if v is not None or tz == "+03:00":
        out["problems"].append(f"old session state survived: @v={v} time_zone={tz}")
    cur.execute("CREATE TABLE IF NOT EXISTS cu (id INT PRIMARY KEY, who VARCHAR(40))")
    cur.execute("REPLACE INTO cu VALUES (1, CURRENT_USER())")
    cur.execute("SELECT who FROM cu WHERE id = 1 FOR UPDATE")
    (who,) = cur.fetchone()
    if who != "bw_cu_py@%":
        out["problems"].append(f"write ran as {who}")
    c.close()
    return out


SCENARIOS = {
    "change_user": change_user,
    "session_state": session_state,
    "ps_contexts": ps_contexts,
    "last_statement_info": last_statement_info,
    "multi_statements": multi_statements,
}

if __name__ == "__main__":
    name, port, schema = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    print(json.dumps(SCENARIOS[name](port, schema)))
