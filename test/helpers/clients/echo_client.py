"""Holds one TCP connection to an echo server and sends a numbered line
every 20 ms until SIGTERM, checking that each comes back, in order, once.
Writes {"echoed", "max_gap_ms", "errors"} as JSON to OUT when it stops
(at SIGTERM or the first error).

    python3 echo_client.py HOST PORT OUT
"""
import json
import signal
import socket
import sys
import time

host, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
stop = False


def on_term(*_):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
echoed, max_gap, errors, buffered, n = 0, 0.0, [], b'', 0
sock = socket.create_connection((host, port), timeout=30)
last = time.monotonic()
while not stop:
    try:
        sock.sendall(b'%d\n' % n)
        while b'\n' not in buffered:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError('the server closed the connection')
            buffered += data
        line, buffered = buffered.split(b'\n', 1)
        if line != b'%d' % n:
            errors.append('sent %d, got back %r' % (n, line))
            break
    except Exception as e:  # a reset, a timeout: the end of the test's connection
        errors.append('%s: %s' % (type(e).__name__, e))
        break
    now = time.monotonic()
    max_gap, last, echoed, n = max(max_gap, now - last), now, echoed + 1, n + 1
    with open(out + '.count', 'w') as f:
        f.write(str(echoed))
    time.sleep(0.02)
with open(out, 'w') as f:
    json.dump({'echoed': echoed, 'max_gap_ms': round(max_gap * 1000), 'errors': errors}, f)
