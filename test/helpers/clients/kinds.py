#!/usr/bin/env python3
"""One kind of process state, set up once and checked every tick, for the
breadth suite (test/e2e/breadth.test.ts):

    python3 kinds.py KIND [ARG]

It runs in its working directory (a workload's own, which moves with it)
and keeps "TICK STATUS" in ./progress: TICK counts the checks since it
started (memory only, so a restored copy goes on counting) and STATUS is
"ok" or what the check found wrong. Each check proves the state still
works: a pipe still holds its data, a lock is still held, a timer still
fires, and so on.
"""
import ctypes
import fcntl
import os
import select
import signal
import socket
import sqlite3
import struct
import sys
import threading
import time

kind = sys.argv[1]
arg = sys.argv[2] if len(sys.argv) > 2 else ''
libc = ctypes.CDLL(None, use_errno=True)
state = {}


def fail(why):
    raise AssertionError(why)


def try_lock(path, how):
    """Whether another process can take the lock now: forks one that tries."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fd = os.open(path, os.O_RDWR)
            if how == 'flock':
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            elif how == 'posix':
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack('hhqqi', fcntl.F_WRLCK, 0, 0, 0, 0))
        except OSError:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status) == 0


def setup():
    if kind == 'threads':
        state['counts'] = [0, 0, 0]

        def work(i):
            while True:
                state['counts'][i] += 1
                time.sleep(0.01)

        for i in range(3):
            threading.Thread(target=work, args=(i,), daemon=True).start()
        state['seen'] = [0, 0, 0]
    elif kind == 'session':
        state['sid'], state['pgid'] = os.getsid(0), os.getpgid(0)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            while True:
                os.write(w, b'x')
                time.sleep(0.05)
        os.close(w)
        os.set_blocking(r, False)
        state['child'], state['from_child'] = pid, r
    elif kind == 'zombie':
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        time.sleep(0.2)
        state['zombie'] = pid
    elif kind == 'pipe':
        r, w = os.pipe()
        os.write(w, b'buffered data')
        state['pipe'] = (r, w)
    elif kind == 'fifo':
        if not os.path.exists('fifo'):
            os.mkfifo('fifo')
        r = os.open('fifo', os.O_RDONLY | os.O_NONBLOCK)
        w = os.open('fifo', os.O_WRONLY)
        os.write(w, b'in the fifo')
        state['fifo'] = (r, w)
    elif kind in ('unix-stream', 'unix-dgram', 'unix-seqpacket'):
        t = {'unix-stream': socket.SOCK_STREAM, 'unix-dgram': socket.SOCK_DGRAM,
             'unix-seqpacket': socket.SOCK_SEQPACKET}[kind]
        state['pair'] = socket.socketpair(socket.AF_UNIX, t)
        path = os.path.abspath('listening.sock')
        if os.path.exists(path):
            os.unlink(path)
        server = socket.socket(socket.AF_UNIX, t)
        server.bind(path)
        if t != socket.SOCK_DGRAM:
            server.listen(4)
        state['server'], state['path'], state['type'] = server, path, t
    elif kind == 'eventfd':
        state['efd'] = os.eventfd(0)
    elif kind == 'signalfd':
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
        mask = ctypes.create_string_buffer(128)
        ctypes.memset(mask, 0, 128)
        word = ctypes.cast(mask, ctypes.POINTER(ctypes.c_ulong))
        word[0] = 1 << (signal.SIGUSR1 - 1)
        fd = libc.signalfd(-1, mask, os.O_NONBLOCK)
        if fd < 0:
            fail('signalfd: errno %d' % ctypes.get_errno())
        state['sfd'] = fd
    elif kind == 'timerfd':
        fd = libc.timerfd_create(1, os.O_NONBLOCK)
        spec = (ctypes.c_long * 4)(0, 20_000_000, 0, 20_000_000)  # every 20 ms, from 20 ms
        if fd < 0 or libc.timerfd_settime(fd, 0, spec, None) != 0:
            fail('timerfd: errno %d' % ctypes.get_errno())
        state['tfd'] = fd
    elif kind == 'epoll':
        r, w = os.pipe()
        ep = select.epoll()
        ep.register(r, select.EPOLLIN)
        state['ep'], state['epipe'] = ep, (r, w)
    elif kind == 'inotify':
        os.makedirs('watched', exist_ok=True)
        fd = libc.inotify_init1(os.O_NONBLOCK)
        if fd < 0 or libc.inotify_add_watch(fd, b'watched', 0x100) < 0:  # IN_CREATE
            fail('inotify: errno %d' % ctypes.get_errno())
        state['ifd'], state['created'] = fd, 0
    elif kind == 'memfd':
        fd = os.memfd_create('kinds')
        os.write(fd, b'in memory only')
        state['memfd'] = fd
    elif kind == 'deleted':
        state['reps'] = int(arg) if arg else 1000
        with open('gone', 'wb') as f:
            f.write(b'deleted but open' * state['reps'])
        state['gone'] = os.open('gone', os.O_RDONLY)
        os.unlink('gone')
    elif kind == 'open-file':
        state['held'] = os.open(arg, os.O_RDONLY)
    elif kind in ('flock', 'posix', 'ofd'):
        fd = os.open('locked', os.O_RDWR | os.O_CREAT, 0o644)
        if kind == 'flock':
            fcntl.flock(fd, fcntl.LOCK_EX)
        elif kind == 'posix':
            fcntl.lockf(fd, fcntl.LOCK_EX)
        else:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack('hhqqi', fcntl.F_WRLCK, 0, 0, 0, 0))
        state['lockfd'] = fd
    elif kind == 'perf':
        attr = (ctypes.c_uint8 * 128)()
        struct.pack_into('IIQ', attr, 0, 1, 128, 0)  # PERF_TYPE_SOFTWARE, its size, the CPU clock
        state['perf'] = libc.syscall(298, attr, 0, -1, -1, 0)  # perf_event_open
        if state['perf'] < 0:
            fail('perf_event_open: errno %d' % ctypes.get_errno())
    elif kind == 'sqlite':
        db = sqlite3.connect('app.sqlite', isolation_level=None)
        db.execute('pragma journal_mode=delete')
        db.execute('create table if not exists t (n integer)')
        db.execute('begin immediate')
        for n in range(100):
            db.execute('insert into t values (?)', (n,))
        state['db'] = db
    else:
        fail('unknown kind ' + kind)


def check(tick):
    if kind == 'threads':
        counts = list(state['counts'])
        if tick > 2 and counts == state['seen']:
            fail('the threads stopped counting')
        state['seen'] = counts
    elif kind == 'session':
        if (os.getsid(0), os.getpgid(0)) != (state['sid'], state['pgid']):
            fail('session or group changed')
        if os.getpgid(state['child']) != state['pgid']:
            fail('the child left the group')
    elif kind == 'zombie':
        if tick == 30:
            pid, status = os.waitpid(state['zombie'], os.WNOHANG)
            if pid != state['zombie'] or os.WEXITSTATUS(status) != 7:
                fail('the zombie was not there to reap with its status')
    elif kind in ('pipe', 'fifo'):
        r, w = state[kind]
        data = os.read(r, 64)
        expected = b'buffered data' if kind == 'pipe' else b'in the fifo'
        if data != expected:
            fail('read %r from the %s' % (data, kind))
        os.write(w, expected)
    elif kind.startswith('unix-'):
        a, b = state['pair']
        a.send(b'ping %d' % tick)
        if b.recv(64) != b'ping %d' % tick:
            fail('the socket pair lost a message')
        c = socket.socket(socket.AF_UNIX, state['type'])
        if state['type'] == socket.SOCK_DGRAM:
            c.sendto(b'hello', state['path'])
            if state['server'].recv(64) != b'hello':
                fail('the bound datagram socket lost a message')
        else:
            c.connect(state['path'])
            s, _ = state['server'].accept()
            c.send(b'hello')
            if s.recv(64) != b'hello':
                fail('the listening socket lost a message')
            s.close()
        c.close()
    elif kind == 'eventfd':
        os.eventfd_write(state['efd'], 3)
        if os.eventfd_read(state['efd']) != 3:
            fail('the eventfd counted wrong')
    elif kind == 'signalfd':
        os.kill(os.getpid(), signal.SIGUSR1)
        info = os.read(state['sfd'], 128)
        if struct.unpack('I', info[:4])[0] != signal.SIGUSR1:
            fail('the signalfd did not deliver SIGUSR1')
    elif kind == 'timerfd':
        time.sleep(0.03)
        if struct.unpack('Q', os.read(state['tfd'], 8))[0] < 1:
            fail('the timer did not fire')
    elif kind == 'epoll':
        r, w = state['epipe']
        os.write(w, b'x')
        if state['ep'].poll(1) != [(r, select.EPOLLIN)]:
            fail('epoll did not see the pipe')
        os.read(r, 1)
    elif kind == 'inotify':
        state['created'] += 1
        open('watched/f%d' % state['created'], 'w').close()
        if len(os.read(state['ifd'], 4096)) < 16:
            fail('inotify saw no creation')
    elif kind == 'memfd':
        if os.pread(state['memfd'], 64, 0) != b'in memory only':
            fail('the memfd lost its content')
    elif kind == 'deleted':
        if os.pread(state['gone'], 16, 16 * (state['reps'] - 1)) != b'deleted but open':
            fail('the deleted file lost its content')
    elif kind == 'open-file':
        os.pread(state['held'], 1, 0)
    elif kind in ('flock', 'posix', 'ofd'):
        if try_lock('locked', kind):
            fail('the %s lock is no longer held' % kind)
    elif kind == 'sqlite':
        db = state['db']
        if tick == 30:
            db.execute('commit')
        if tick >= 30:
            n = db.execute('select count(*) from t').fetchone()[0]
            if n < 100:
                fail('the transaction lost its rows: %d' % n)


setup()
progress = os.open('progress', os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
tick = 0
while True:
    tick += 1
    try:
        check(tick)
        status = 'ok'
    except Exception as e:  # the test reads what went wrong
        status = ('%s: %s' % (type(e).__name__, e)).replace('\n', ' ')
    line = ('%d %s' % (tick, status)).encode()[:200].ljust(200)
    os.pwrite(progress, line, 0)
    time.sleep(0.05)
