#!/usr/bin/env python3
"""Asks an HTTP URL every INTERVAL seconds on one keep-alive connection
until SIGTERM, printing a line per answer ("ok MS BODY") or error
("error MS WHAT"), then a summary line ("summary ASKED ANSWERED ERRORS
LONGEST_MS"). It first waits up to 10 s for the server to accept a
connection: a service still starting is not an error of the move.

    python3 examples/poll.py URL [INTERVAL]
"""
import http.client
import signal
import sys
import time
import urllib.parse

url = urllib.parse.urlsplit(sys.argv[1])
interval = float(sys.argv[2]) if len(sys.argv) > 2 else 0.05
stop = False


def on_term(*_):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGINT, on_term)
conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=30)
ready_by = time.monotonic() + 10
while not stop:
    try:
        conn.connect()
        break
    except ConnectionRefusedError:
        if time.monotonic() > ready_by:
            raise
        time.sleep(0.05)
asked = answered = errors = 0
longest = 0.0
while not stop:
    started = time.monotonic()
    asked += 1
    try:
        conn.request('GET', url.path or '/')
        body = conn.getresponse().read().decode().strip()
        answered += 1
        took = time.monotonic() - started
        print('ok %d %s' % (took * 1000, body), flush=True)
    except Exception as e:  # reported, then a new connection
        errors += 1
        took = time.monotonic() - started
        print('error %d %s: %s' % (took * 1000, type(e).__name__, e), flush=True)
        conn.close()
    longest = max(longest, took)
    time.sleep(interval)
print('summary %d %d %d %d' % (asked, answered, errors, longest * 1000), flush=True)
