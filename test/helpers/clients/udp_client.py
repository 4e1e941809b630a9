"""Sends a numbered datagram to a UDP echo server every 20 ms until
SIGTERM, waiting up to 200 ms for each answer. Writes {"sent",
"answered", "wrong", "max_gap_ms"} to OUT when it stops, and the count
answered so far to OUT.count as it goes.

    python3 udp_client.py HOST PORT OUT
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
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(0.2)
sent, answered, wrong, n = 0, 0, 0, 0
last = time.monotonic()
max_gap = 0.0
while not stop:
    payload = b'%d' % n
    sock.sendto(payload, (host, port))
    sent += 1
    try:
        while True:
            data, _ = sock.recvfrom(65536)
            if data == payload:
                answered += 1
                now = time.monotonic()
                max_gap, last = max(max_gap, now - last), now
                break
            if int(data) > n:
                wrong += 1  # an answer to a datagram not sent yet
    except socket.timeout:
        pass
    except OSError:
        time.sleep(0.02)  # an ICMP error: nobody listened for a moment
    with open(out + '.count', 'w') as f:
        f.write(str(answered))
    n += 1
    time.sleep(0.02)
with open(out, 'w') as f:
    json.dump({'sent': sent, 'answered': answered, 'wrong': wrong, 'max_gap_ms': round(max_gap * 1000)}, f)
