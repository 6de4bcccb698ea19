"""Opens N NBD connections to HOST:PORT, each through the fixed-newstyle handshake and NBD_OPT_GO of
EXPORT, prints "open N" and holds them idle until stdin closes (bench/idle-connections.sh)."""
import socket, struct, sys, time, os
host, port, n, export = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].encode()
NBD_OPT_GO = 7
socks = []
def handshake():
    s = socket.create_connection((host, port))
    hdr = b''
    while len(hdr) < 18:
        c = s.recv(18 - len(hdr))
        if not c: raise SystemExit("closed in greeting")
        hdr += c
    assert hdr[:8] == b'NBDMAGIC', hdr
    s.sendall(struct.pack('>I', 1 | 2))  # fixed newstyle, no zeroes
    data = struct.pack('>I', len(export)) + export + struct.pack('>H', 0)
    s.sendall(b'IHAVEOPT' + struct.pack('>II', NBD_OPT_GO, len(data)) + data)
    while True:
        rep = b''
        while len(rep) < 20:
            c = s.recv(20 - len(rep))
            if not c: raise SystemExit("closed in option")
            rep += c
        magic, opt, typ, ln = struct.unpack('>QIII', rep)
        body = b''
        while len(body) < ln:
            body += s.recv(ln - len(body))
        if typ == 1: return s  # ACK
        if typ & 0x80000000: raise SystemExit("error reply %x %r" % (typ, body))
for i in range(n):
    socks.append(handshake())
print("open", len(socks), flush=True)
sys.stdin.readline()
