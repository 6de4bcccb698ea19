"""A minimal QMP client for bench/vs-qsd.sh (qemu-storage-daemon's monitor on a unix socket).
  qmp.py SOCKET COMMAND [JSON-ARGUMENTS]   runs one command, prints its "return" as JSON
  qmp.py SOCKET wait-ready JOB TIMEOUT_S   until the block job is ready with nothing left to copy
  qmp.py SOCKET wait-gone JOB TIMEOUT_S    until the block job has finished (after a cancel/complete)
An error reply or a timeout exits non-zero with the reason on stderr."""
import json, socket, sys, time

def connect(path):
    s = socket.socket(socket.AF_UNIX)
    for _ in range(100):  # the daemon may still be starting
        try:
            s.connect(path)
            break
        except OSError:
            time.sleep(0.05)
    else:
        sys.exit("qmp: cannot connect to %s" % path)
    f = s.makefile("rw")
    json.loads(f.readline())  # greeting
    call(f, "qmp_capabilities")
    return f

def call(f, cmd, args=None):
    msg = {"execute": cmd}
    if args:
        msg["arguments"] = args
    f.write(json.dumps(msg) + "\n")
    f.flush()
    while True:
        line = f.readline()
        if not line:
            sys.exit("qmp: monitor closed during %s" % cmd)
        r = json.loads(line)
        if "event" in r:
            continue
        if "error" in r:
            sys.exit("qmp: %s: %s" % (cmd, r["error"].get("desc", r["error"])))
        return r["return"]

def job(f, name):
    return next((j for j in call(f, "query-block-jobs") if j["device"] == name), None)

f = connect(sys.argv[1])
cmd = sys.argv[2]
if cmd in ("wait-ready", "wait-gone"):
    name, deadline = sys.argv[3], time.monotonic() + float(sys.argv[4])
    while time.monotonic() < deadline:
        j = job(f, name)
        if cmd == "wait-gone" and j is None:
            sys.exit(0)
        if cmd == "wait-ready":
            if j is None:
                sys.exit("qmp: job %s is gone" % name)
            # Ready, and the background copy has caught up with every write so far.
            if j["ready"] and j["offset"] == j["len"]:
                sys.exit(0)
        time.sleep(0.02)
    sys.exit("qmp: timed out in %s %s" % (cmd, name))
print(json.dumps(call(f, cmd, json.loads(sys.argv[3]) if len(sys.argv) > 3 else None)))
