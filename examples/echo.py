#!/usr/bin/env python3
"""An echo service for trying migrations: TCP on one port, UDP on the next.

    python3 examples/echo.py [--port 9000] [--bind 0.0.0.0]

Every TCP connection gets back what it sends; every UDP datagram is sent
back to its sender.
"""
import argparse
import socket
import threading

parser = argparse.ArgumentParser()
parser.add_argument('--port', type=int, default=9000)
parser.add_argument('--bind', default='0.0.0.0')
args = parser.parse_args()


def serve(conn):
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)


def udp():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((args.bind, args.port + 1))
    while True:
        data, peer = sock.recvfrom(65536)
        sock.sendto(data, peer)


threading.Thread(target=udp, daemon=True).start()
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((args.bind, args.port))
listener.listen(64)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
