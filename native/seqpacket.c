/*
 * Unix SOCK_SEQPACKET sockets for Node.js, which has none of its own.
 *
 * CRIU's RPC service speaks one protobuf message per packet and sizes each
 * message with recv(MSG_PEEK | MSG_TRUNC), so a stream socket cannot carry
 * it. This addon does only what the transport needs: connect (and listen /
 * accept, for fake services in tests), send one packet, receive one packet
 * of whatever size with any file descriptors attached (SCM_RIGHTS), and a
 * readiness watcher on the libuv loop so that nothing ever blocks Node's
 * main thread; and for CRIU's swrk workers, socket pairs, a way to make a
 * descriptor blocking before it is handed over, and a splice relay between
 * two descriptors in a thread of its own. Everything else (framing, timeouts, errors) lives in
 * TypeScript.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <node_api.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <uv.h>

#define MAX_FDS_PER_PACKET 16

/* An Error for a failed system call as Node makes them: "SYSCALL: message", with code, errno and syscall. */
static napi_value errno_error(napi_env env, const char *syscall, int err) {
  char msg[256];
  const char *code = uv_err_name(uv_translate_sys_error(err));
  snprintf(msg, sizeof(msg), "%s: %s", syscall, strerror(err));
  napi_value error, code_value, msg_value, errno_value, syscall_value;
  napi_create_string_utf8(env, code, NAPI_AUTO_LENGTH, &code_value);
  napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &msg_value);
  napi_create_error(env, code_value, msg_value, &error);
  napi_create_int32(env, err, &errno_value);
  napi_set_named_property(env, error, "errno", errno_value);
  napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &syscall_value);
  napi_set_named_property(env, error, "syscall", syscall_value);
  return error;
}

static napi_value throw_errno(napi_env env, const char *syscall, int err) {
  napi_throw(env, errno_error(env, syscall, err));
  return NULL;
}

static napi_value throw_type(napi_env env, const char *msg) {
  napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", msg);
  return NULL;
}

static int get_fd(napi_env env, napi_value value, int *fd) {
  napi_valuetype type;
  napi_typeof(env, value, &type);
  if (type != napi_number) return 0;
  return napi_get_value_int32(env, value, fd) == napi_ok && *fd >= 0;
}

static int get_address(napi_env env, napi_value value, struct sockaddr_un *addr) {
  size_t len = 0;
  memset(addr, 0, sizeof(*addr));
  addr->sun_family = AF_UNIX;
  if (napi_get_value_string_utf8(env, value, NULL, 0, &len) != napi_ok) return 0;
  if (len == 0 || len >= sizeof(addr->sun_path)) return 0;
  napi_get_value_string_utf8(env, value, addr->sun_path, sizeof(addr->sun_path), &len);
  return 1;
}

/* connect(path: string): number */
static napi_value js_connect(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], result;
  struct sockaddr_un addr;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 1 || !get_address(env, argv[0], &addr))
    return throw_type(env, "connect(path): path must be a string of 1 to 107 bytes");
  /* Connect blocking (a local connect completes or fails at once), then
   * switch to non-blocking for the packet exchange. */
  int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (fd < 0) return throw_errno(env, "socket", errno);
  if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
    int err = errno;
    close(fd);
    return throw_errno(env, "connect", err);
  }
  if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0) {
    int err = errno;
    close(fd);
    return throw_errno(env, "fcntl", err);
  }
  napi_create_int32(env, fd, &result);
  return result;
}

/* listen(path: string, backlog: number): number */
static napi_value js_listen(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2], result;
  struct sockaddr_un addr;
  int backlog = 16;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 1 || !get_address(env, argv[0], &addr))
    return throw_type(env, "listen(path, backlog): path must be a string of 1 to 107 bytes");
  if (argc > 1) napi_get_value_int32(env, argv[1], &backlog);
  int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return throw_errno(env, "socket", errno);
  if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(fd, backlog) < 0) {
    int err = errno;
    close(fd);
    return throw_errno(env, "bind", err);
  }
  napi_create_int32(env, fd, &result);
  return result;
}

/* accept(fd: number): number | null (null when no connection is waiting) */
static napi_value js_accept(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], result;
  int fd;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 1 || !get_fd(env, argv[0], &fd)) return throw_type(env, "accept(fd): fd must be a number");
  int conn = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (conn < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
      napi_get_null(env, &result);
      return result;
    }
    return throw_errno(env, "accept", errno);
  }
  napi_create_int32(env, conn, &result);
  return result;
}

/*
 * socketpair(stream: boolean): [number, number]. A connected pair of Unix
 * sockets, SOCK_SEQPACKET (for CRIU's swrk RPC) or SOCK_STREAM (the page
 * stream CRIU reads or writes as ps.fd), both close-on-exec: the end given
 * to a child is placed by spawn, which clears the flag there. The first
 * end is made non-blocking (the one this process keeps); the second stays
 * blocking, as CRIU expects of its descriptors.
 */
static napi_value js_socketpair(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], result, value;
  bool stream = false;
  int fds[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc > 0) napi_get_value_bool(env, argv[0], &stream);
  if (socketpair(AF_UNIX, (stream ? SOCK_STREAM : SOCK_SEQPACKET) | SOCK_CLOEXEC, 0, fds) < 0)
    return throw_errno(env, "socketpair", errno);
  if (stream) {
    /* A page stream's pair: room for 4 MiB in flight each way, so CRIU and the relay thread wake
     * each other once per few MiB rather than per 200 KiB (the default). FORCE needs CAP_NET_ADMIN,
     * which the agent has; without it the kernel's wmem_max caps the plain request. */
    int size = 4 << 20;
    for (int i = 0; i < 2; i++) {
      if (setsockopt(fds[i], SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof(size)) < 0)
        (void)setsockopt(fds[i], SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
    }
  }
  if (fcntl(fds[0], F_SETFL, fcntl(fds[0], F_GETFL) | O_NONBLOCK) < 0) {
    int err = errno;
    close(fds[0]);
    close(fds[1]);
    return throw_errno(env, "fcntl", err);
  }
  napi_create_array_with_length(env, 2, &result);
  for (uint32_t i = 0; i < 2; i++) {
    napi_create_int32(env, fds[i], &value);
    napi_set_element(env, result, i, value);
  }
  return result;
}

/*
 * blocking(fd: number): void. Clears O_NONBLOCK on a descriptor about to be
 * handed to CRIU, which reads and writes its sockets blocking (libuv made
 * it non-blocking, and the flag belongs to the open file, which the child
 * shares).
 */
static napi_value js_blocking(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int fd;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 1 || !get_fd(env, argv[0], &fd)) return throw_type(env, "blocking(fd): fd must be a number");
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) < 0) return throw_errno(env, "fcntl", errno);
  return NULL;
}

/*
 * Runs `body(arg)` in a detached thread of its own, which reports through
 * `*done`, a thread-safe function calling `callback` with `call_js`. False,
 * with a JavaScript error thrown, when either cannot be made; the caller
 * then frees `arg`.
 */
static bool start_thread(napi_env env, napi_value callback, const char *name, napi_threadsafe_function_call_js call_js,
                         napi_threadsafe_function *done, void *(*body)(void *), void *arg) {
  napi_value resource_name;
  napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &resource_name);
  if (napi_create_threadsafe_function(env, callback, NULL, resource_name, 0, 1, NULL, NULL, NULL, call_js, done) !=
      napi_ok) {
    throw_errno(env, "napi_create_threadsafe_function", EINVAL);
    return false;
  }
  pthread_t thread;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  int err = pthread_create(&thread, &attr, body, arg);
  pthread_attr_destroy(&attr);
  if (err != 0) {
    napi_release_threadsafe_function(*done, napi_tsfn_abort);
    throw_errno(env, "pthread_create", err);
    return false;
  }
  return true;
}

/*
 * relay(from: number, to: number, callback: (error: Error | null, bytes: number) => void): void
 *
 * Moves bytes from one descriptor to another with splice(2) through a pipe,
 * in a thread of its own, until end of file on `from`; then shuts down
 * writing on `to` and calls back with the bytes moved. Both descriptors must
 * be blocking and stay open until the callback (the caller closes them).
 * The source agent joins CRIU's end of a page stream (a Unix socket, which
 * takes no TCP_CORK) to its TCP connection this way: the kernel moves the
 * pages, nothing is copied through JavaScript. No SPLICE_F_MORE on the
 * write: it would hold a short last command back like a cork.
 */
typedef struct {
  int from, to;
  int64_t bytes;
  int err;
  napi_threadsafe_function done;
} relay_t;

static void relay_call_js(napi_env env, napi_value callback, void *context, void *data) {
  (void)context;
  relay_t *r = (relay_t *)data;
  if (env != NULL && callback != NULL) {
    napi_value argv[2], undefined;
    if (r->err != 0) argv[0] = errno_error(env, "splice", r->err);
    else napi_get_null(env, &argv[0]);
    napi_create_double(env, (double)r->bytes, &argv[1]);
    napi_get_undefined(env, &undefined);
    napi_call_function(env, undefined, callback, 2, argv, NULL);
  }
  free(r);
}

static void *relay_thread(void *arg) {
  relay_t *r = (relay_t *)arg;
  int p[2];
  if (pipe2(p, O_CLOEXEC) < 0) {
    r->err = errno;
  } else {
    fcntl(p[1], F_SETPIPE_SZ, 1 << 20);
    for (;;) {
      ssize_t n = splice(r->from, NULL, p[1], NULL, 1 << 20, SPLICE_F_MOVE);
      if (n == 0) break;
      if (n < 0) {
        if (errno == EINTR) continue;
        r->err = errno;
        break;
      }
      while (n > 0) {
        ssize_t m = splice(p[0], NULL, r->to, NULL, (size_t)n, SPLICE_F_MOVE);
        if (m < 0) {
          if (errno == EINTR) continue;
          r->err = errno;
          break;
        }
        n -= m;
        r->bytes += m;
      }
      if (r->err != 0) break;
    }
    close(p[0]);
    close(p[1]);
    shutdown(r->to, SHUT_WR);
  }
  napi_threadsafe_function done = r->done;
  napi_call_threadsafe_function(done, r, napi_tsfn_blocking);
  napi_release_threadsafe_function(done, napi_tsfn_release);
  return NULL;
}

static napi_value js_relay(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  int from, to;
  napi_valuetype type;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 3 || !get_fd(env, argv[0], &from) || !get_fd(env, argv[1], &to))
    return throw_type(env, "relay(from, to, callback): from and to must be descriptors");
  napi_typeof(env, argv[2], &type);
  if (type != napi_function) return throw_type(env, "relay(from, to, callback): callback must be a function");
  relay_t *r = calloc(1, sizeof(*r));
  if (r == NULL) return throw_errno(env, "calloc", ENOMEM);
  r->from = from;
  r->to = to;
  if (!start_thread(env, argv[2], "ferry-page-relay", relay_call_js, &r->done, relay_thread, r)) free(r);
  return NULL;
}

/*
 * tlsRelay(plain: number, net: number, options, callback): void
 *   options: { server: boolean, ca: string, cert: string, key: string, peer: string } (PEM file paths;
 *            peer: the IP or host name the other agent's certificate must name)
 *   callback: (error: Error | null, bytes: number, protocol: string, cipher: string) => void
 *
 * Mutual TLS 1.3 on `net` with OpenSSL (Node's own, whose symbols the node
 * binary exports), and the bytes relayed between `plain` and the session in
 * a thread of its own until both directions have ended: what the agents
 * carry encrypted pages with. `bytes` counts what went from plain into the
 * session. Both descriptors must be blocking and stay open until the
 * callback (the caller closes them).
 */
#define TLS_RELAY_BUFFER (256 * 1024)

typedef struct {
  int plain, net;
  bool server;
  char *ca, *cert, *key, *peer;
  int64_t bytes;
  char error[256];
  char protocol[32], cipher[64];
  napi_threadsafe_function done;
} tls_relay_t;

static void tls_fail(tls_relay_t *r, const char *what) {
  unsigned long e = ERR_get_error();
  char detail[160] = "";
  if (e != 0) ERR_error_string_n(e, detail, sizeof(detail));
  else if (errno != 0) snprintf(detail, sizeof(detail), "%s", strerror(errno));
  snprintf(r->error, sizeof(r->error), "%s%s%s", what, detail[0] ? ": " : "", detail);
  ERR_clear_error();
}

static bool write_all(int fd, const char *buf, size_t len) {
  while (len > 0) {
    ssize_t n = write(fd, buf, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    buf += n;
    len -= (size_t)n;
  }
  return true;
}

static bool peer_is(X509 *cert, const char *peer) {
  unsigned char addr[16];
  if (inet_pton(AF_INET, peer, addr) == 1 || inet_pton(AF_INET6, peer, addr) == 1)
    return X509_check_ip_asc(cert, peer, 0) == 1;
  return X509_check_host(cert, peer, 0, 0, NULL) == 1;
}

static void tls_relay_session(tls_relay_t *r) {
  SSL_CTX *ctx = SSL_CTX_new(r->server ? TLS_server_method() : TLS_client_method());
  SSL *ssl = NULL;
  char *buf = NULL;
  if (ctx == NULL) return tls_fail(r, "SSL_CTX_new");
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  /* AES-128-GCM first: about a tenth less CPU per byte than AES-256 here (AES-NI), on both ends of
   * every page; the other TLS 1.3 suites stay acceptable. */
  SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256");
  if (SSL_CTX_use_certificate_chain_file(ctx, r->cert) != 1 ||
      SSL_CTX_use_PrivateKey_file(ctx, r->key, SSL_FILETYPE_PEM) != 1 ||
      SSL_CTX_load_verify_locations(ctx, r->ca, NULL) != 1) {
    tls_fail(r, "loading the agent's certificate");
    goto out;
  }
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
  /* A record that carries no data (a session ticket) must not make SSL_read wait for one that
   * does on the blocking socket, while the other direction waits for this thread. */
  SSL_CTX_clear_mode(ctx, SSL_MODE_AUTO_RETRY);
  /* Fewer system calls per byte: records read ahead into one large buffer, and written through one
   * (flushed after each write), instead of two reads and a write per 16 KiB record. */
  SSL_CTX_set_read_ahead(ctx, 1);
  SSL_CTX_set_default_read_buffer_len(ctx, TLS_RELAY_BUFFER);
  ssl = SSL_new(ctx);
  BIO *rbio = BIO_new_socket(r->net, BIO_NOCLOSE);
  BIO *wsock = BIO_new_socket(r->net, BIO_NOCLOSE);
  BIO *wbio = BIO_new(BIO_f_buffer());
  if (ssl == NULL || rbio == NULL || wsock == NULL || wbio == NULL ||
      BIO_set_write_buffer_size(wbio, TLS_RELAY_BUFFER + 4096) != 1) {
    BIO_free(rbio);
    BIO_free(wsock);
    BIO_free(wbio);
    tls_fail(r, "SSL_new");
    goto out;
  }
  SSL_set_bio(ssl, rbio, BIO_push(wbio, wsock));
  if (!r->server) {
    /* The page server's certificate must name the address we connected to. */
    X509_VERIFY_PARAM *param = SSL_get0_param(ssl);
    unsigned char addr[16];
    int ok = inet_pton(AF_INET, r->peer, addr) == 1 || inet_pton(AF_INET6, r->peer, addr) == 1
                 ? X509_VERIFY_PARAM_set1_ip_asc(param, r->peer)
                 : X509_VERIFY_PARAM_set1_host(param, r->peer, 0);
    if (ok != 1) {
      tls_fail(r, "setting the expected peer");
      goto out;
    }
  }
  if ((r->server ? SSL_accept(ssl) : SSL_connect(ssl)) != 1) {
    tls_fail(r, "TLS handshake");
    goto out;
  }
  if (r->server) {
    /* Only the migration's source: its certificate must name its host. */
    X509 *cert = SSL_get1_peer_certificate(ssl);
    bool ok = cert != NULL && peer_is(cert, r->peer);
    X509_free(cert);
    if (!ok) {
      snprintf(r->error, sizeof(r->error), "the peer's certificate does not name %s, the migration's source", r->peer);
      goto out;
    }
  }
  snprintf(r->protocol, sizeof(r->protocol), "%s", SSL_get_version(ssl));
  snprintf(r->cipher, sizeof(r->cipher), "%s", SSL_get_cipher_name(ssl));
  buf = malloc(TLS_RELAY_BUFFER);
  if (buf == NULL) {
    snprintf(r->error, sizeof(r->error), "out of memory");
    goto out;
  }
  bool plain_open = true, net_open = true;
  while (plain_open || net_open) {
    bool net_ready = net_open && SSL_has_pending(ssl) == 1;
    bool plain_ready = false;
    if (!net_ready) {
      struct pollfd fds[2] = {{r->plain, plain_open ? POLLIN : 0, 0}, {r->net, net_open ? POLLIN : 0, 0}};
      if (poll(fds, 2, -1) < 0) {
        if (errno == EINTR) continue;
        tls_fail(r, "poll");
        break;
      }
      plain_ready = plain_open && (fds[0].revents & (POLLIN | POLLHUP | POLLERR));
      net_ready = net_open && (fds[1].revents & (POLLIN | POLLHUP | POLLERR));
    }
    if (plain_ready) {
      ssize_t n = read(r->plain, buf, TLS_RELAY_BUFFER);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        tls_fail(r, "reading CRIU's side");
        break;
      }
      if (n == 0) {
        plain_open = false;
        SSL_shutdown(ssl); /* close_notify: the other agent ends its side of CRIU's stream */
        (void)BIO_flush(SSL_get_wbio(ssl));
      } else if (SSL_write(ssl, buf, (int)n) != (int)n || BIO_flush(SSL_get_wbio(ssl)) != 1) {
        tls_fail(r, "sending");
        break;
      } else {
        r->bytes += n;
      }
    }
    if (net_ready) {
      int n = SSL_read(ssl, buf, TLS_RELAY_BUFFER);
      if (n > 0) {
        if (!write_all(r->plain, buf, (size_t)n)) {
          tls_fail(r, "writing CRIU's side");
          break;
        }
      } else {
        int err = SSL_get_error(ssl, n);
        if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) continue;
        if (err == SSL_ERROR_ZERO_RETURN || (err == SSL_ERROR_SYSCALL && ERR_peek_error() == 0)) {
          net_open = false;
          shutdown(r->plain, SHUT_WR);
          /* The other side is gone: what CRIU still sends has nowhere to go. */
          if (err == SSL_ERROR_SYSCALL) plain_open = false;
        } else {
          tls_fail(r, "receiving");
          break;
        }
      }
    }
  }
out:
  free(buf);
  if (ssl != NULL) SSL_free(ssl);
  SSL_CTX_free(ctx);
  ERR_clear_error();
}

static void *tls_relay_thread(void *arg) {
  tls_relay_t *r = (tls_relay_t *)arg;
  tls_relay_session(r);
  shutdown(r->net, SHUT_RDWR);
  napi_threadsafe_function done = r->done;
  napi_call_threadsafe_function(done, r, napi_tsfn_blocking);
  napi_release_threadsafe_function(done, napi_tsfn_release);
  return NULL;
}

static void tls_relay_free(tls_relay_t *r) {
  free(r->ca);
  free(r->cert);
  free(r->key);
  free(r->peer);
  free(r);
}

static void tls_relay_call_js(napi_env env, napi_value callback, void *context, void *data) {
  (void)context;
  tls_relay_t *r = (tls_relay_t *)data;
  if (env != NULL && callback != NULL) {
    napi_value argv[4], undefined;
    if (r->error[0] != '\0') {
      napi_value code, message;
      napi_create_string_utf8(env, "ETLSRELAY", NAPI_AUTO_LENGTH, &code);
      napi_create_string_utf8(env, r->error, NAPI_AUTO_LENGTH, &message);
      napi_create_error(env, code, message, &argv[0]);
    } else {
      napi_get_null(env, &argv[0]);
    }
    napi_create_double(env, (double)r->bytes, &argv[1]);
    napi_create_string_utf8(env, r->protocol, NAPI_AUTO_LENGTH, &argv[2]);
    napi_create_string_utf8(env, r->cipher, NAPI_AUTO_LENGTH, &argv[3]);
    napi_get_undefined(env, &undefined);
    napi_call_function(env, undefined, callback, 4, argv, NULL);
  }
  tls_relay_free(r);
}

static char *get_string_property(napi_env env, napi_value object, const char *name) {
  napi_value value;
  size_t len = 0;
  if (napi_get_named_property(env, object, name, &value) != napi_ok) return NULL;
  if (napi_get_value_string_utf8(env, value, NULL, 0, &len) != napi_ok || len == 0 || len > 4096) return NULL;
  char *s = malloc(len + 1);
  if (s != NULL) napi_get_value_string_utf8(env, value, s, len + 1, &len);
  return s;
}

static napi_value js_tls_relay(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4], server;
  int plain, net;
  napi_valuetype type;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 4 || !get_fd(env, argv[0], &plain) || !get_fd(env, argv[1], &net))
    return throw_type(env, "tlsRelay(plain, net, options, callback): plain and net must be descriptors");
  napi_typeof(env, argv[3], &type);
  if (type != napi_function) return throw_type(env, "tlsRelay: callback must be a function");
  tls_relay_t *r = calloc(1, sizeof(*r));
  if (r == NULL) return throw_errno(env, "calloc", ENOMEM);
  r->plain = plain;
  r->net = net;
  if (napi_get_named_property(env, argv[2], "server", &server) == napi_ok) napi_get_value_bool(env, server, &r->server);
  r->ca = get_string_property(env, argv[2], "ca");
  r->cert = get_string_property(env, argv[2], "cert");
  r->key = get_string_property(env, argv[2], "key");
  r->peer = get_string_property(env, argv[2], "peer");
  if (r->ca == NULL || r->cert == NULL || r->key == NULL || r->peer == NULL) {
    tls_relay_free(r);
    return throw_type(env, "tlsRelay: options need ca, cert, key and peer");
  }
  if (!start_thread(env, argv[3], "ferry-tls-relay", tls_relay_call_js, &r->done, tls_relay_thread, r))
    tls_relay_free(r);
  return NULL;
}

/* send(fd: number, packet: Uint8Array): void. One call, one packet. */
static napi_value js_send(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  int fd;
  void *data;
  size_t length;
  napi_typedarray_type type;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 2 || !get_fd(env, argv[0], &fd)) return throw_type(env, "send(fd, packet): fd must be a number");
  if (napi_get_typedarray_info(env, argv[1], &type, &length, &data, NULL, NULL) != napi_ok ||
      type != napi_uint8_array)
    return throw_type(env, "send(fd, packet): packet must be a Uint8Array");
  ssize_t n;
  do {
    n = send(fd, data, length, MSG_NOSIGNAL);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return throw_errno(env, "send", errno);
  return NULL;
}

/*
 * recv(fd: number): null | { data: Buffer | null, fds: number[] }
 * null: nothing to read yet. data null: the peer closed the connection.
 * Received descriptors are close-on-exec and belong to the caller.
 */
static napi_value js_recv(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], result, data_value, fds_value;
  int fd;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 1 || !get_fd(env, argv[0], &fd)) return throw_type(env, "recv(fd): fd must be a number");

  /* The real size of the next packet, as CRIU itself measures it. */
  ssize_t size;
  do {
    size = recv(fd, NULL, 0, MSG_PEEK | MSG_TRUNC | MSG_DONTWAIT);
  } while (size < 0 && errno == EINTR);
  if (size < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      napi_get_null(env, &result);
      return result;
    }
    return throw_errno(env, "recv", errno);
  }

  void *buffer_data = NULL;
  napi_value buffer;
  napi_create_buffer(env, size > 0 ? (size_t)size : 1, &buffer_data, &buffer);

  union {
    struct cmsghdr align;
    char buf[CMSG_SPACE(sizeof(int) * MAX_FDS_PER_PACKET)];
  } control;
  struct iovec iov = {.iov_base = buffer_data, .iov_len = size > 0 ? (size_t)size : 1};
  struct msghdr msg = {
      .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf, .msg_controllen = sizeof(control.buf)};
  ssize_t n;
  do {
    n = recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      napi_get_null(env, &result);
      return result;
    }
    return throw_errno(env, "recvmsg", errno);
  }

  napi_create_object(env, &result);
  napi_create_array(env, &fds_value);
  uint32_t nfds = 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    int *fds = (int *)CMSG_DATA(c);
    for (size_t i = 0; i < count; i++) {
      napi_value v;
      napi_create_int32(env, fds[i], &v);
      napi_set_element(env, fds_value, nfds++, v);
    }
  }
  napi_set_named_property(env, result, "fds", fds_value);

  /* A zero-length read on a SEQPACKET socket is the peer's close. */
  if (n == 0 && nfds == 0) {
    napi_get_null(env, &data_value);
  } else {
    napi_create_buffer_copy(env, (size_t)n, buffer_data, NULL, &data_value);
  }
  napi_set_named_property(env, result, "data", data_value);
  napi_value truncated;
  napi_get_boolean(env, (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0, &truncated);
  napi_set_named_property(env, result, "truncated", truncated);
  return result;
}

/* close(fd: number): void */
static napi_value js_close(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int fd;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 1 || !get_fd(env, argv[0], &fd)) return throw_type(env, "close(fd): fd must be a number");
  if (close(fd) < 0 && errno != EINTR) return throw_errno(env, "close", errno);
  return NULL;
}

/* shutdown(fd: number): void. Both directions; wakes a peer waiting on us. */
static napi_value js_shutdown(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int fd;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 1 || !get_fd(env, argv[0], &fd)) return throw_type(env, "shutdown(fd): fd must be a number");
  if (shutdown(fd, SHUT_RDWR) < 0 && errno != ENOTCONN) return throw_errno(env, "shutdown", errno);
  return NULL;
}

/*
 * A readiness watcher: watch(fd, callback) calls callback(error, events) on
 * the main thread whenever fd is readable or the peer hung up, until
 * unwatch(handle). The handle owns a uv_poll_t; its memory is freed once
 * libuv has closed the poll and JavaScript has dropped the handle.
 */
typedef struct {
  uv_poll_t poll;
  napi_env env;
  napi_ref callback;
  napi_async_context context;
  int stopped;
  int uv_closed;
  int finalized;
} watcher_t;

static void watcher_on_close(uv_handle_t *handle) {
  watcher_t *w = (watcher_t *)handle->data;
  w->uv_closed = 1;
  if (w->finalized) free(w);
}

static void watcher_stop(watcher_t *w) {
  if (w->stopped) return;
  w->stopped = 1;
  uv_poll_stop(&w->poll);
  napi_delete_reference(w->env, w->callback);
  napi_async_destroy(w->env, w->context);
  uv_close((uv_handle_t *)&w->poll, watcher_on_close);
}

static void watcher_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  watcher_t *w = (watcher_t *)data;
  w->finalized = 1;
  watcher_stop(w);
  if (w->uv_closed) free(w);
}

static void watcher_on_event(uv_poll_t *handle, int status, int events) {
  watcher_t *w = (watcher_t *)handle->data;
  if (w->stopped) return;
  napi_env env = w->env;
  napi_handle_scope scope;
  napi_open_handle_scope(env, &scope);
  napi_value callback, global, argv[2], result;
  napi_get_reference_value(env, w->callback, &callback);
  napi_get_global(env, &global);
  if (status < 0) {
    napi_value msg;
    napi_create_string_utf8(env, uv_strerror(status), NAPI_AUTO_LENGTH, &msg);
    napi_create_error(env, NULL, msg, &argv[0]);
  } else {
    napi_get_null(env, &argv[0]);
  }
  napi_create_int32(env, events, &argv[1]);
  if (callback != NULL &&
      napi_make_callback(env, w->context, global, callback, 2, argv, &result) == napi_pending_exception) {
    napi_value error;
    napi_get_and_clear_last_exception(env, &error);
    napi_fatal_exception(env, error);
  }
  napi_close_handle_scope(env, scope);
}

/* watch(fd: number, callback: (error: Error | null, events: number) => void): object */
static napi_value js_watch(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2], handle, resource_name;
  napi_valuetype type;
  int fd;
  uv_loop_t *loop;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 2 || !get_fd(env, argv[0], &fd)) return throw_type(env, "watch(fd, callback): fd must be a number");
  napi_typeof(env, argv[1], &type);
  if (type != napi_function) return throw_type(env, "watch(fd, callback): callback must be a function");
  napi_get_uv_event_loop(env, &loop);

  watcher_t *w = calloc(1, sizeof(*w));
  if (w == NULL) return throw_errno(env, "calloc", ENOMEM);
  w->env = env;
  int rc = uv_poll_init(loop, &w->poll, fd);
  if (rc < 0) {
    free(w);
    return throw_errno(env, "uv_poll_init", -rc);
  }
  w->poll.data = w;
  napi_create_reference(env, argv[1], 1, &w->callback);
  napi_create_string_utf8(env, "SeqpacketWatch", NAPI_AUTO_LENGTH, &resource_name);
  napi_async_init(env, NULL, resource_name, &w->context);
  rc = uv_poll_start(&w->poll, UV_READABLE | UV_DISCONNECT, watcher_on_event);
  if (rc < 0) {
    watcher_stop(w);
    w->finalized = 1; /* no JavaScript handle will ever own it */
    return throw_errno(env, "uv_poll_start", -rc);
  }
  napi_create_external(env, w, watcher_finalize, NULL, &handle);
  return handle;
}

/* unwatch(handle: object): void. Safe to call more than once. */
static napi_value js_unwatch(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  void *data = NULL;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 1 || napi_get_value_external(env, argv[0], &data) != napi_ok || data == NULL)
    return throw_type(env, "unwatch(handle): handle must come from watch()");
  watcher_stop((watcher_t *)data);
  return NULL;
}

/*
 * warm(bytes: number, callback: (error: Error | null, ms: number, warmed: number) => void): void
 *
 * Faults in `bytes` of anonymous memory and frees it again, in a thread of
 * its own, and calls back with the time it took and how much it faulted in:
 * it stops early after WARM_LIMIT_MS, so a large process cannot hold the
 * switchover up for long. On a virtual machine that
 * hands free memory back to its hypervisor (free page reporting), memory
 * first touched after that is slow to fault in (a few times slower than
 * memory just freed); the destination warms what a switchover is about to
 * take (the page images and the restored memory) just before the freeze,
 * and the freed pages are the first the kernel hands out next.
 */
#define WARM_LIMIT_MS 20000.0
#define WARM_CHUNK (64u << 20)

typedef struct {
  size_t bytes, warmed;
  double ms;
  int err;
  napi_threadsafe_function done;
} warm_t;

static double ms_since(const struct timespec *t0) {
  struct timespec t1;
  clock_gettime(CLOCK_MONOTONIC, &t1);
  return (double)(t1.tv_sec - t0->tv_sec) * 1e3 + (double)(t1.tv_nsec - t0->tv_nsec) / 1e6;
}

static void warm_call_js(napi_env env, napi_value callback, void *context, void *data) {
  (void)context;
  warm_t *w = (warm_t *)data;
  if (env != NULL && callback != NULL) {
    napi_value argv[3], undefined;
    if (w->err != 0) argv[0] = errno_error(env, "mmap", w->err);
    else napi_get_null(env, &argv[0]);
    napi_create_double(env, w->ms, &argv[1]);
    napi_create_double(env, (double)w->warmed, &argv[2]);
    napi_get_undefined(env, &undefined);
    napi_call_function(env, undefined, callback, 3, argv, NULL);
  }
  free(w);
}

static void *warm_thread(void *arg) {
  warm_t *w = (warm_t *)arg;
  struct timespec t0;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  char *p = mmap(NULL, w->bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    w->err = errno;
  } else {
    /* One write per page faults it in; all of it is held until the end, so that each page is fresh. */
    long page = sysconf(_SC_PAGESIZE);
    while (w->warmed < w->bytes && ms_since(&t0) < WARM_LIMIT_MS) {
      size_t end = w->warmed + WARM_CHUNK < w->bytes ? w->warmed + WARM_CHUNK : w->bytes;
      for (size_t off = w->warmed; off < end; off += (size_t)page) ((volatile char *)p)[off] = 1;
      w->warmed = end;
    }
    munmap(p, w->bytes);
  }
  w->ms = ms_since(&t0);
  napi_threadsafe_function done = w->done;
  napi_call_threadsafe_function(done, w, napi_tsfn_blocking);
  napi_release_threadsafe_function(done, napi_tsfn_release);
  return NULL;
}

static napi_value js_warm(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  double bytes = 0;
  napi_valuetype type;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 2 || napi_get_value_double(env, argv[0], &bytes) != napi_ok || !(bytes > 0))
    return throw_type(env, "warm(bytes, callback): bytes must be a number above 0");
  napi_typeof(env, argv[1], &type);
  if (type != napi_function) return throw_type(env, "warm(bytes, callback): callback must be a function");
  warm_t *w = calloc(1, sizeof(*w));
  if (w == NULL) return throw_errno(env, "calloc", ENOMEM);
  w->bytes = (size_t)bytes;
  if (!start_thread(env, argv[1], "ferry-warm", warm_call_js, &w->done, warm_thread, w)) free(w);
  return NULL;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"connect", NULL, js_connect, NULL, NULL, NULL, napi_enumerable, NULL},
      {"listen", NULL, js_listen, NULL, NULL, NULL, napi_enumerable, NULL},
      {"accept", NULL, js_accept, NULL, NULL, NULL, napi_enumerable, NULL},
      {"socketpair", NULL, js_socketpair, NULL, NULL, NULL, napi_enumerable, NULL},
      {"blocking", NULL, js_blocking, NULL, NULL, NULL, napi_enumerable, NULL},
      {"relay", NULL, js_relay, NULL, NULL, NULL, napi_enumerable, NULL},
      {"tlsRelay", NULL, js_tls_relay, NULL, NULL, NULL, napi_enumerable, NULL},
      {"send", NULL, js_send, NULL, NULL, NULL, napi_enumerable, NULL},
      {"recv", NULL, js_recv, NULL, NULL, NULL, napi_enumerable, NULL},
      {"close", NULL, js_close, NULL, NULL, NULL, napi_enumerable, NULL},
      {"shutdown", NULL, js_shutdown, NULL, NULL, NULL, napi_enumerable, NULL},
      {"watch", NULL, js_watch, NULL, NULL, NULL, napi_enumerable, NULL},
      {"unwatch", NULL, js_unwatch, NULL, NULL, NULL, napi_enumerable, NULL},
      {"warm", NULL, js_warm, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
