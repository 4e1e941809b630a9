#!/usr/bin/env python3
"""A small HTTP/1.1 service for trying migrations: keep-alive connections,
a request count that lives only in its memory, and optional ballast memory.

    python3 examples/web.py [--port 8080] [--bind 0.0.0.0] [--memory-mb N]

GET / answers "served N" (N counts every request since the start, so a
count that goes on across a migration shows the same process answering).
"""
import argparse
import http.server
import threading

parser = argparse.ArgumentParser()
parser.add_argument('--port', type=int, default=8080)
parser.add_argument('--bind', default='0.0.0.0')
parser.add_argument('--memory-mb', type=int, default=0)
args = parser.parse_args()

# Touched once, so that it is resident and every migration copies it.
ballast = bytearray(args.memory_mb * 1024 * 1024)
for i in range(0, len(ballast), 4096):
    ballast[i] = 1

served = 0
lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    # As servers built for load do: no Nagle wait for the ACK of the headers before the body.
    disable_nagle_algorithm = True

    def do_GET(self):
        global served
        with lock:
            served += 1
            body = b'served %d\n' % served
        self.send_response(200)
        self.send_header('Content-Type', 'text/plain')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_):
        pass


server = http.server.ThreadingHTTPServer((args.bind, args.port), Handler)
server.daemon_threads = True
server.serve_forever()
